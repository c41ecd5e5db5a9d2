"""Per-request token sampling for the fused decode step.

Flover fuses every live request into one decode step over a fixed-capacity
array of S slots, so the sampler must serve a batch in which each row may use
different settings (greedy next to top-p next to a penalised row).  Design:

* Settings are data, not static configuration.  `SamplingParams` is the public,
  host-side, per-request object; `SlotSampling` holds the same settings as [S]
  device arrays.  `sample_tokens` reads them as arrays, so ONE compiled function
  serves every mix of per-request settings and admitting a request with new
  settings never recompiles.

* Reproducible random streams.  Row b samples with
  `fold_in(key(seed[b]), step[b])`, where `step` counts the tokens that request
  has generated.  A request's output therefore depends only on its own logits,
  seed and progress - never on which slot it landed in or on the other rows of
  the batch - so results are stable under continuous batching and
  preempt/resume.  The sampler is written so that no row's result depends on
  another row, including through the batch-level `lax.cond` fast paths below.

* Pipeline per row (HF / vLLM order): repetition penalty -> presence penalty ->
  (temperature == 0: argmax, lowest index on ties) or (divide by temperature ->
  top-k -> top-p over the top-k-renormalised distribution -> sample).  Tokens
  tied with the top-k / top-p boundary value are all kept (HF semantics), so a
  filter can keep more than k tokens only when logits tie exactly.

* CPU cost.  Decode logits are up to [64, 49152] per step; elementwise passes
  are cheap (~15 ms), a full per-row sort is not (~0.6 s on CPU).  Batch-level
  `lax.cond`s skip work that no row needs: all sampling when every row is
  greedy, all filtering when no sampling row uses top-k / top-p, and the
  larger top-k / top-p candidate sets (`lax.top_k` of 256, then 4096, then a
  full sort) when the smaller one already decides every row.  Each row takes
  its result from a choice that depends on that row alone, so the fast paths
  never leak one row's settings into another row's token.  (Under an outer
  `vmap` the conds become selects and every branch runs, so call the sampler
  on the whole batch rather than vmapping it.)

* Sampling draws ONE uniform per row and inverts the CDF of the filtered
  distribution (a cumsum), instead of `jax.random.categorical`'s Gumbel trick,
  which generates and transforms V random numbers per row: ~6 ms against
  ~45 ms for [64, 49152] on CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flover_jax.sampling_params import MAX_TOP_LOGPROBS, SamplingParams

__all__ = [
    "DEFAULT_CANDIDATE_TIERS",
    "Sampled",
    "SlotSampling",
    "apply_penalties",
    "count_tokens",
    "first_argmax",
    "mark_tokens",
    "report",
    "sample_tokens",
    "token_logprobs",
    "top_logprobs",
]

_GREEDY = SamplingParams()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotSampling:
    """Per-slot sampling settings as arrays (a pytree), one entry per slot.

    Only the settings the device needs live here; stop strings, stop ids and
    `max_new_tokens` are checked by the host scheduler.  Free slots hold the
    greedy defaults.
    """

    temperature: jax.Array  # f32[S]; 0 = greedy
    top_k: jax.Array  # i32[S]; 0 = off
    top_p: jax.Array  # f32[S]; 1 = off
    repetition_penalty: jax.Array  # f32[S]; 1 = off
    presence_penalty: jax.Array  # f32[S]; 0 = off
    frequency_penalty: jax.Array  # f32[S]; 0 = off
    seed: jax.Array  # i32[S]
    logprobs: jax.Array  # bool[S]: report the sampled token's log-probability
    top_logprobs: jax.Array  # i32[S]: and this many alternatives (0 = none)

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], num_slots: int | None = None
    ) -> SlotSampling:
        """Host-side (numpy) build; slot i gets params[i], slots beyond use greedy defaults."""
        n = len(params) if num_slots is None else num_slots
        if len(params) > n:
            raise ValueError(f"num_slots={n}: fewer than the {len(params)} params given")
        for p in params:
            p.validate()
        rows = list(params) + [_GREEDY] * (n - len(params))
        return cls(
            temperature=np.array([p.temperature for p in rows], np.float32),
            top_k=np.array([p.top_k for p in rows], np.int32),
            top_p=np.array([p.top_p for p in rows], np.float32),
            repetition_penalty=np.array([p.repetition_penalty for p in rows], np.float32),
            presence_penalty=np.array([p.presence_penalty for p in rows], np.float32),
            frequency_penalty=np.array([p.frequency_penalty for p in rows], np.float32),
            seed=np.array([p.seed for p in rows], np.int32),
            logprobs=np.array([p.logprobs for p in rows], bool),
            top_logprobs=np.array([p.top_logprobs for p in rows], np.int32),
        )

    @classmethod
    def greedy(cls, num_slots: int) -> SlotSampling:
        """All-greedy settings for `num_slots` empty slots, as jax arrays: traceable, so that
        evaluating a decode state's shapes allocates nothing (the capacity check does)."""
        one = cls.from_params([_GREEDY])
        return jax.tree.map(lambda row: jnp.full((num_slots,), row[0], row.dtype), one)

    @property
    def num_slots(self) -> int:
        return int(self.temperature.shape[0])


class Sampled(NamedTuple):
    """What a prefill or decode step sampled, a row each: device arrays from the verbs,
    numpy once the host reads them."""

    tokens: Any  # int32[rows]; -1 where a row sampled nothing
    logprobs: Any  # float32[rows]; log P(token) for rows that asked for it, 0 elsewhere
    top_ids: Any  # int32[rows, MAX_TOP_LOGPROBS]: the likeliest tokens, most likely first
    top_logprobs: Any  # float32[rows, MAX_TOP_LOGPROBS]: their log P; 0 where no row asked


def _log_normaliser(logits: jax.Array) -> jax.Array:
    """log sum exp of each row, f32[B]: log P(token) = logit - this."""
    top = jnp.max(logits, axis=-1)
    return top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))


def token_logprobs(logits: jax.Array, tokens: jax.Array, wanted: jax.Array) -> jax.Array:
    """log P(token) under each row's model distribution (the logits as the model gives them:
    before penalties, temperature and filters), f32[B]; 0 where not `wanted`. Computed only
    when some row wants it."""

    def compute() -> jax.Array:
        chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
        return jnp.where(wanted, chosen - _log_normaliser(logits), 0.0).astype(jnp.float32)

    return lax.cond(jnp.any(wanted), compute, lambda: jnp.zeros(tokens.shape, jnp.float32))


def top_logprobs(logits: jax.Array, wanted: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The MAX_TOP_LOGPROBS likeliest tokens of each row and their log P under the model (as
    `token_logprobs`), i32[B, K] and f32[B, K], most likely first (lowest id first on ties);
    zeros where not `wanted`. Computed only when some row wants them; a request keeps as many
    as it asked for."""
    shape = (logits.shape[0], MAX_TOP_LOGPROBS)

    def compute() -> tuple[jax.Array, jax.Array]:
        values, ids = lax.top_k(logits, MAX_TOP_LOGPROBS)
        values = values - _log_normaliser(logits)[:, None]
        return (jnp.where(wanted[:, None], ids, 0).astype(jnp.int32),
                jnp.where(wanted[:, None], values, 0.0).astype(jnp.float32))

    return lax.cond(jnp.any(wanted), compute,
                    lambda: (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32)))


def report(logits: jax.Array, tokens: jax.Array, active: jax.Array,
           params: SlotSampling) -> Sampled:
    """What a step hands the host for each row: its token (-1 where inactive), and the
    log-probabilities its request asked for."""
    ids, values = top_logprobs(logits, active & (params.top_logprobs > 0))
    return Sampled(jnp.where(active, tokens, -1),
                   token_logprobs(logits, tokens, active & params.logprobs), ids, values)


def plain_greedy(params: SlotSampling, active: jax.Array) -> jax.Array:
    """Whether every row takes the argmax of its logits as they are (no temperature, no
    penalty) and no active row asks for log-probabilities: then a step needs only each row's
    argmax (`greedy_report`), not the logits. A bool scalar."""
    wants_logprobs = jnp.any(active & (params.logprobs | (params.top_logprobs > 0)))
    return ~(_penalised(params) | jnp.any(params.temperature > 0) | wants_logprobs)


def greedy_report(tokens: jax.Array, active: jax.Array) -> Sampled:
    """`report` of rows that picked `tokens` greedily and asked for no log-probabilities."""
    shape = (tokens.shape[0], MAX_TOP_LOGPROBS)
    return Sampled(jnp.where(active, tokens, -1), jnp.zeros(tokens.shape, jnp.float32),
                   jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32))


def _penalised(params: SlotSampling) -> jax.Array:
    """Whether any row uses a repetition, presence or frequency penalty (a bool scalar)."""
    return (jnp.any(params.repetition_penalty != 1.0) | jnp.any(params.presence_penalty != 0.0)
            | jnp.any(params.frequency_penalty != 0.0))


def apply_penalties(
    logits: jax.Array, params: SlotSampling, seen: jax.Array, counts: jax.Array
) -> jax.Array:
    """Repetition (HF) then presence and frequency (OpenAI/vLLM) penalties; f32[B, V] ->
    f32[B, V].

    `seen`: bool[B, V], tokens in the prompt or output; `counts`: i32[B, V], how often each
    token is in the output.  A penalty of 1 (resp. 0) leaves logits bit-exact.
    """
    rep = params.repetition_penalty[:, None]
    # Dividing a negative logit would *raise* its probability, hence the sign split.
    penalised = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalised, logits)
    # Only where a token was generated: elsewhere the logit stays bit for bit.
    drop = params.presence_penalty[:, None] + params.frequency_penalty[:, None] * counts
    return jnp.where(counts > 0, logits - drop, logits)


# Candidate-set sizes tried before falling back to a full sort (see _filter_thresholds).
DEFAULT_CANDIDATE_TIERS: tuple[int, ...] = (256, 4096)


def _tier_thresholds(
    scaled: jax.Array,
    z_full: jax.Array,
    k_eff: jax.Array,
    top_p: jax.Array,
    size: int,
) -> tuple[jax.Array, jax.Array]:
    """Top-k/top-p threshold of each row from its `size` largest logits.

    The kept set is always a prefix of the descending order, so one threshold
    value per row (the last kept value) masks the original, unsorted logits
    without a scatter.  Returns (threshold f32[B, 1], resolved bool[B]);
    `resolved` is False where the answer needs values beyond the candidates.
    """
    vocab = scaled.shape[-1]
    if size >= vocab:
        size = vocab
        desc = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)  # sorting values only: no indices
    else:
        desc = lax.top_k(scaled, size)[0]  # f32[B, size], descending
    # top-k keeps every token tied with its k-th value, so the kept set is the prefix of
    # values >= that value; the candidates know it when the ties end inside them.
    top_k_off = k_eff >= vocab
    kth = jnp.take_along_axis(desc, jnp.clip(jnp.minimum(k_eff, size), 1, size)[:, None] - 1, -1)
    in_top_k = top_k_off[:, None] | (desc >= kth)
    ties_inside = (size >= vocab) | (desc[:, -1] < kth[:, 0])
    weights = jnp.where(in_top_k, jnp.exp(desc), 0.0)
    # top-p sees the distribution renormalised over the top-k set (HF order).
    # With top-k off the normaliser is the whole row's, which the candidates
    # alone cannot give; with k <= size it is the candidates' own sum.
    z = jnp.where(top_k_off, z_full, jnp.sum(weights, axis=-1))
    probs = weights / z[:, None]
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumsum
    # Keep position i iff the mass strictly above it is < p: the smallest prefix
    # reaching p.  Position 0 has mass 0 < p, so at least the top token stays.
    n_p = jnp.sum(mass_before < top_p[:, None], axis=-1)
    # p = 1 is exactly "off" whatever the rounding; n_p == size means the
    # nucleus may run past the candidates (only the full sort can tell).
    n_p = jnp.where((top_p >= 1.0) | (n_p >= size), vocab, n_p)
    n_k = jnp.where(top_k_off, vocab, jnp.sum(in_top_k, axis=-1))
    cutoff = jnp.clip(jnp.minimum(n_k, n_p), 1, vocab)  # i32[B], tokens kept
    z_known = top_k_off | ((k_eff <= size) & ties_inside)
    resolved = z_known & (cutoff <= size)
    threshold = jnp.take_along_axis(desc, jnp.minimum(cutoff, size)[:, None] - 1, axis=-1)
    return threshold, resolved


def _filter_thresholds(
    scaled: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    filtered: jax.Array,
    tiers: Sequence[int],
) -> jax.Array:
    """Per-row top-k-then-top-p threshold, f32[B, 1] (meaningful where `filtered`).

    A full descending sort per row gives both filters at once, but on CPU it
    costs ~0.6 s for [64, 49152] (a comparator merge sort), while `lax.top_k`
    with a small k costs ~10 ms.  So the thresholds come from the top `tiers[0]`
    logits when those suffice (top_k <= tier, or the nucleus ends inside them -
    the usual case for real LM logits), else from the next tier, and only as a
    last resort from a full sort; each larger tier runs under `lax.cond` only
    if some filtered row still needs it.  A row always takes its answer from
    the smallest tier that resolves it, a fact about the row alone, so the
    result does not depend on which other rows forced the larger tiers.

    `scaled` is sample_tokens' (logits shifted to a row maximum of 0, over the
    temperature), so its exponentials cannot overflow.
    """
    vocab = scaled.shape[-1]
    sizes = sorted({t for t in tiers if 0 < t < vocab}) + [vocab]
    k_eff = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k).astype(jnp.int32)
    z_full = jnp.sum(jnp.exp(scaled), axis=-1)

    threshold, resolved = _tier_thresholds(scaled, z_full, k_eff, top_p, sizes[0])
    for size in sizes[1:]:

        def refine(
            threshold: jax.Array = threshold, resolved: jax.Array = resolved, size: int = size
        ) -> tuple[jax.Array, jax.Array]:
            t, r = _tier_thresholds(scaled, z_full, k_eff, top_p, size)
            return jnp.where(resolved[:, None], threshold, t), resolved | r

        def keep(
            threshold: jax.Array = threshold, resolved: jax.Array = resolved
        ) -> tuple[jax.Array, jax.Array]:
            return threshold, resolved

        threshold, resolved = lax.cond(jnp.any(filtered & ~resolved), refine, keep)
    return threshold


def first_argmax(x: jax.Array, block: int = 128) -> jax.Array:
    """jnp.argmax(x, axis=-1) for x [B, V] (lowest index on ties, the first NaN if any), i32[B].

    Why: XLA:CPU reduces argmax's (value, index) pairs one element at a time, 5% of a 32-slot
    decode step. A max over blocks of `block` columns vectorizes; the argmax then runs over the
    [B, V / block] block maxima and over the one block holding the first maximum, about 20x
    faster for [32, 49152] logits (benchmarks/NOTES.md)."""
    rows, columns = x.shape
    lowest = False if x.dtype == jnp.bool_ else -jnp.inf
    padded = jnp.pad(x, ((0, 0), (0, -columns % block)), constant_values=lowest)
    blocks = padded.reshape(rows, -1, block)
    first_block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)  # the first block holding the max
    inside = jnp.take_along_axis(blocks, first_block[:, None, None], axis=1)[:, 0]
    return (first_block * block + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def _inverse_cdf_sample(masked: jax.Array, seed: jax.Array, step: jax.Array) -> jax.Array:
    """One uniform per row, inverted through the row's CDF; i32[B].

    Never returns a token whose logit is -inf, even under cumsum rounding.
    """
    def uniform(s: jax.Array, t: jax.Array) -> jax.Array:
        # Stream depends on (seed, step) only: not on the slot or the batch.
        return jax.random.uniform(jax.random.fold_in(jax.random.key(s), t), (), jnp.float32)

    u = jax.vmap(uniform)(seed, step)  # f32[B] in [0, 1)
    top = jnp.max(masked, axis=-1, keepdims=True)
    weights = jnp.exp(masked - jnp.where(jnp.isfinite(top), top, 0.0))  # 0 where masked
    cdf = jnp.cumsum(weights, axis=-1)  # unnormalised; top token weighs 1
    target = u[:, None] * cdf[:, -1:]
    # cumsum may be a tree scan on CPU/GPU, so the CDF need not be exactly flat
    # over zero-weight tokens: require weight > 0 explicitly.
    hit = (cdf > target) & (weights > 0)
    return jnp.where(jnp.any(hit, axis=-1), first_argmax(hit), first_argmax(masked))


def sample_tokens(
    logits: jax.Array,
    params: SlotSampling,
    step: jax.Array,
    seen: jax.Array,
    generated: jax.Array,
    *,
    mask_offset: jax.Array | int = 0,
    candidate_tiers: Sequence[int] = DEFAULT_CANDIDATE_TIERS,
) -> jax.Array:
    """Pick the next token of every row in one vectorised, jittable call.

    Args:
      logits: f32[B, V] next-token logits.
      params: SlotSampling with fields of shape [B].
      step: i32[B] tokens generated so far by each row's request (the PRNG
        stream position: key = fold_in(key(seed), step)).
      seen: bool[N, V], N >= B: tokens in the prompt or output (repetition penalty).
      generated: i32[N, V] times each token is in the output (presence, frequency penalty).
      mask_offset: row b's masks are row mask_offset + b of `seen` / `generated`, so a
        decode step can pass the whole slot table's masks: they are read only when a row
        uses a penalty.
      candidate_tiers: static; candidate-set sizes tried for top-k / top-p
        before a full sort (a speed knob only: results do not depend on it
        beyond float rounding at the top-p boundary).

    Returns:
      i32[B] token ids.  Rows with temperature 0 get the argmax of the
      penalised logits (lowest index on ties).
    """
    logits = logits.astype(jnp.float32)
    # Penalties read two [B, V] masks: skip them when no row uses one (the default).
    penalised = _penalised(params)

    def penalise() -> jax.Array:
        def rows(mask: jax.Array) -> jax.Array:
            return lax.dynamic_slice_in_dim(mask, mask_offset, logits.shape[0])

        return apply_penalties(logits, params, rows(seen), rows(generated))

    sampling = params.temperature > 0  # bool[B]
    any_sampling = jnp.any(sampling)

    def pick() -> jax.Array:
        scored = lax.cond(penalised, penalise, lambda: logits)
        greedy = first_argmax(scored)

        def sample() -> jax.Array:
            # Greedy rows divide by 1 (no 0-division). Shifted to a row maximum of 0 first, the
            # logits stay <= 0 however small T is: no overflow to inf (and NaN in the softmax),
            # and a gap of one ulp still counts at T = 1e-9.
            temperature = jnp.where(sampling, params.temperature, 1.0)
            top = jnp.max(scored, axis=-1, keepdims=True)
            top = jnp.where(jnp.isfinite(top), top, 0.0)  # an all -inf row must not make NaNs
            scaled = (scored - top) / temperature[:, None]
            filtered = sampling & ((params.top_k > 0) | (params.top_p < 1.0))  # bool[B]

            def mask() -> jax.Array:
                threshold = _filter_thresholds(
                    scaled, params.top_k, params.top_p, filtered, candidate_tiers
                )
                return jnp.where(filtered[:, None] & (scaled < threshold), -jnp.inf, scaled)

            # Skip all filter work when no sampling row filters; unfiltered rows
            # are left as they are on both sides, bit for bit.
            masked = lax.cond(jnp.any(filtered), mask, lambda: scaled)
            drawn = _inverse_cdf_sample(masked, params.seed, step.astype(jnp.int32))
            return jnp.where(sampling, drawn, greedy)

        # Penalised batches of greedy rows skip the sampling work.
        return lax.cond(any_sampling, sample, lambda: greedy)

    # The common batch, all greedy without penalties, takes the argmax of the logits as they
    # are: through the conds above, XLA would first copy them ([B, V], megabytes at 64 rows).
    return lax.cond(penalised | any_sampling, pick, lambda: first_argmax(logits))


def mark_tokens(
    mask: jax.Array, tokens: jax.Array, rows_active: jax.Array, row_offset: jax.Array | int = 0
) -> jax.Array:
    """Return `mask` (bool[N, V]) with mask[row_offset + b, tokens[b]] set for active rows b.

    Used by the decode step to grow `seen` / `generated` in place, for its window of the
    slot table.  Inactive rows are left untouched whatever their token (free slots may carry
    garbage ids).
    """
    rows = row_offset + jnp.arange(tokens.shape[0])
    cols = jnp.where(rows_active, tokens, 0)  # an in-range column for inactive rows
    # Rows are distinct, so this scatter has no colliding writes.
    return mask.at[rows, cols].set(mask[rows, cols] | rows_active)


def count_tokens(
    counts: jax.Array, tokens: jax.Array, rows_active: jax.Array, row_offset: jax.Array | int = 0
) -> jax.Array:
    """Return `counts` (i32[N, V]) with counts[row_offset + b, tokens[b]] one higher for active
    rows b (the output's token counts, for the frequency penalty)."""
    rows = row_offset + jnp.arange(tokens.shape[0])
    cols = jnp.where(rows_active, tokens, 0)
    return counts.at[rows, cols].add(rows_active.astype(counts.dtype))
