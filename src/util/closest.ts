/** Edit distance (Levenshtein) between two strings. */
export function editDistance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [
    i,
    ...new Array<number>(b.length).fill(0),
  ]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      d[i]![j] = Math.min(
        d[i - 1]![j]! + 1,
        d[i]![j - 1]! + 1,
        d[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    }
  }
  return d[a.length]![b.length]!;
}

/**
 * The candidate nearest to a mistyped `word`, if one is near enough to be a likely typo
 * (at most max(2, a third of the word's length) edits away).
 *
 * @example closest('epoch', ['epochs', 'seed']) // → 'epochs'
 */
export function closest(word: string, candidates: readonly string[]): string | null {
  const best = candidates
    .map((c) => [c, editDistance(word, c)] as const)
    .filter(([, d]) => d <= Math.max(2, Math.floor(word.length / 3)))
    .sort((a, b) => a[1] - b[1])[0];
  return best ? best[0] : null;
}
