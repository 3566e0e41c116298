/* Deadline-first apportionment (Tijdeman's rule): the inner loop of data_mix/blend.py.
 *
 * Slot n (0-based) gives one sample to a corpus. With k corpora of positive share and
 * d = 1 / (2k - 2), corpus i is eligible when its deficit w_i * (n + 1) - c_i >= d;
 * among eligible corpora the one whose deficit would first reach 1 - d, at time
 * (c_i + 1 - d) / w_i, wins (ties: lowest index). Every prefix then keeps every corpus
 * within 1 - 1/(2k - 2) samples of w_i * n (R. Tijdeman, "The chairman assignment
 * problem", Discrete Mathematics 32, 1980): 0.93 for 8 corpora, 0.5 for 2.
 * Built with -ffp-contract=off so that the floating-point steps are the same on every
 * machine and the schedule is reproducible.
 *
 * counts: in/out, per corpus, samples given before slot `start` (relative to the stage).
 * corpus_out / rank_out: NULL to only advance the counts, else filled for [start, stop).
 */
#include <stdint.h>

/* (deadline, index) order: earlier deadline first, ties to the lower index. */
static int before(const double *deadline, int32_t a, int32_t b) {
    return deadline[a] < deadline[b] || (deadline[a] == deadline[b] && a < b);
}

void dapt_schedule(int32_t k, const double *shares, int64_t *counts, int64_t start, int64_t stop,
                   int32_t *corpus_out, int64_t *rank_out) {
    /* release[i] = (c_i + d) / w_i: the slot end from which corpus i is eligible;
       deadline[i] = (c_i + 1 - d) / w_i: when its deficit would reach 1 - d.
       Both move only when corpus i is chosen. `order` keeps the corpora sorted by
       deadline, so a slot takes the first eligible corpus in it (almost always the
       first or second) and moves the chosen one back a few places: far fewer,
       better-predicted branches than scanning every corpus. Multiplying by 1/w_i
       rather than dividing keeps divisions out of the loop. */
    double release[256], deadline[256], inverse[256];
    int32_t order[256];
    int32_t active = 0;
    for (int32_t i = 0; i < k; ++i)
        if (shares[i] > 0)
            order[active++] = i;
    if (active == 0 || start >= stop)
        return;
    const double d = active > 1 ? 1.0 / (2.0 * active - 2.0) : 0.0;
    for (int32_t j = 0; j < active; ++j) {
        const int32_t i = order[j];
        inverse[i] = 1.0 / shares[i];
        release[i] = ((double)counts[i] + d) * inverse[i];
        deadline[i] = ((double)counts[i] + 1.0 - d) * inverse[i];
    }
    for (int32_t j = 1; j < active; ++j) { /* insertion sort by (deadline, index) */
        const int32_t i = order[j];
        int32_t p = j;
        while (p > 0 && before(deadline, i, order[p - 1])) {
            order[p] = order[p - 1];
            --p;
        }
        order[p] = i;
    }
    for (int64_t n = start; n < stop; ++n) {
        const double slot_end = (double)(n + 1);
        int32_t p = 0;
        while (p < active && release[order[p]] > slot_end)
            ++p;
        if (p == active) {
            /* Unreachable in exact arithmetic (the deficits sum to 1, so one is >= 1/k > d);
               kept for rounding: give the slot to the corpus eligible soonest. */
            p = 0;
            for (int32_t j = 1; j < active; ++j)
                if (release[order[j]] < release[order[p]])
                    p = j;
        }
        const int32_t best = order[p];
        if (corpus_out) {
            corpus_out[n - start] = best;
            rank_out[n - start] = counts[best];
        }
        counts[best] += 1;
        release[best] = ((double)counts[best] + d) * inverse[best];
        deadline[best] = ((double)counts[best] + 1.0 - d) * inverse[best];
        while (p + 1 < active && before(deadline, order[p + 1], best)) {
            order[p] = order[p + 1];
            ++p;
        }
        order[p] = best;
    }
}
