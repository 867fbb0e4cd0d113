/** Per-class precision, recall and F1, with support (true count). */
export interface ClassMetrics {
  readonly label: string;
  readonly precision: number;
  readonly recall: number;
  readonly f1: number;
  readonly support: number;
}

export interface ClassificationReport {
  readonly accuracy: number;
  readonly count: number;
  readonly perClass: readonly ClassMetrics[];
  /**
   * Unweighted mean over every class of the model, as sklearn's macro average with
   * `labels=` all classes: a class without examples counts with recall 0 (and F1 0), so a
   * test set that leaves classes out cannot look better than one that has them all.
   */
  readonly macro: { precision: number; recall: number; f1: number };
  /** Labels of the classes with no example among the true labels (support 0), in label order. */
  readonly withoutExamples: readonly string[];
  /** confusion[true][predicted] counts. */
  readonly confusion: readonly (readonly number[])[];
  readonly labels: readonly string[];
}

/**
 * Accuracy, per-class P/R/F1 and the confusion matrix from true and predicted class
 * indices. A class never predicted has precision 0, one without examples recall 0
 * (sklearn's zero_division=0).
 */
export function classificationReport(
  truth: ArrayLike<number>,
  predicted: ArrayLike<number>,
  labels: readonly string[],
): ClassificationReport {
  const k = labels.length;
  const confusion = Array.from({ length: k }, () => new Array<number>(k).fill(0));
  let correct = 0;
  for (let i = 0; i < truth.length; i++) {
    const t = truth[i]!;
    const p = predicted[i]!;
    confusion[t]![p]!++;
    if (t === p) correct++;
  }
  const perClass = labels.map((label, c) => {
    const tp = confusion[c]![c]!;
    const support = confusion[c]!.reduce((a, b) => a + b, 0);
    const predictedCount = confusion.reduce((a, row) => a + row[c]!, 0);
    const precision = predictedCount ? tp / predictedCount : 0;
    const recall = support ? tp / support : 0;
    const f1 = precision + recall ? (2 * precision * recall) / (precision + recall) : 0;
    return { label, precision, recall, f1, support };
  });
  const mean = (f: (m: ClassMetrics) => number): number =>
    k ? perClass.reduce((a, m) => a + f(m), 0) / k : 0;
  return {
    accuracy: truth.length ? correct / truth.length : 0,
    count: truth.length,
    perClass,
    macro: {
      precision: mean((m) => m.precision),
      recall: mean((m) => m.recall),
      f1: mean((m) => m.f1),
    },
    withoutExamples: perClass.filter((m) => m.support === 0).map((m) => m.label),
    confusion,
    labels,
  };
}
