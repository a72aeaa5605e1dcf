"""Knowledge-distillation loss: a divergence to the teacher plus next-token cross-entropy.

    loss = alpha * T**2 * mean_masked D(teacher || student at temperature T) + (1 - alpha) * mean_masked CE(student)

`distill_loss` is the reference form on full logits. `chunked_distill_loss` gives the same numbers from hidden
states and LM heads, one chunk of time steps at a time, so float32 [B, T, V] logits never exist for the whole
sequence, in the forward or the backward pass.

Axis legend: B batch, T time, C time steps in a chunk, N chunks, D model (Ds student, Dt teacher), V vocab.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import quant
from fa_jax.errors import FaJaxError
from fa_jax.sharding import constrain_batch, gathered

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _check(divergence, beta, alpha, with_teacher):
    if divergence not in DIVERGENCES:
        raise FaJaxError(f"divergence={divergence!r}: expected one of {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and isinstance(beta, (int, float)) and not 0.0 < beta < 1.0:
        raise FaJaxError(f"beta={beta}: jsd needs 0 < beta < 1 (at 0 or 1 it is identically 0; use forward_kl "
                         "or reverse_kl for those limits)")
    if not with_teacher and not (isinstance(alpha, (int, float)) and alpha == 0):
        raise FaJaxError(f"alpha={alpha} weighs a teacher term, but no teacher was given (use alpha=0)")


def _shared_vocab(student, teacher):
    """Both arrays cut to the first min(Vs, Vt) entries of their last axis (logits [..., V] or heads [D, V]).

    Families pad the vocabulary differently (128256 vs 128264 rows); the padding rows are never real tokens.
    Without a teacher (None) the student keeps its whole vocabulary.
    """
    if teacher is None:
        return student, None
    v = min(student.shape[-1], teacher.shape[-1])
    return student[..., :v], teacher[..., :v]


class TopK(NamedTuple):
    """A teacher distribution kept as its k most probable tokens and one bucket for the rest (`fa-jax
    teacher-cache`): ids [..., k] int (distinct per position, most probable first), logp [..., k] float (their
    log-probabilities at the run's temperature over the shared vocabulary) and tail [...] (the log of the
    probability of every other token; -inf when k is the vocabulary size). Values at masked positions are ignored."""
    ids: jax.Array
    logp: jax.Array
    tail: jax.Array


def _log_mass_outside(logp, ids):
    """log of the probability of every token but `ids` [..., k] (distinct), from log-probabilities [..., V]: a
    log-sum-exp over the other entries, exact however much mass the k tokens hold."""
    index = jnp.indices(ids.shape, sparse=True)[:-1]  # broadcasting row indices, for the scatter
    chosen = jnp.zeros(logp.shape, bool).at[(*index, ids)].set(True)
    return jax.nn.logsumexp(jnp.where(chosen, -jnp.inf, logp), axis=-1)


def _sparse_teacher_terms(s, ls, t: TopK, keep, divergence, beta):
    """Per-token divergence and agreement against a `TopK` teacher, on the coarse distributions over the k cached
    tokens plus one tail bucket (the student's bucket is its probability outside those k tokens).

    s [..., V] student logits (masked rows zeroed), ls [..., V] its log-softmax at the run's temperature. The coarse
    distributions are exact marginals of the full ones, so for k = V the result equals the full divergence (to
    float32 rounding). For k < V, by the chain rule of KL,

        KL(P || Q) = KL_coarse(P || Q) + P(tail) * KL(P(. | tail) || Q(. | tail)),

    so the forward-KL term is never above the full one, and falls short by exactly the teacher's tail mass times
    the divergence of the two distributions' shapes inside the tail; that is at most P(tail) * log(Q(tail) /
    min over the tail of Q) and vanishes as the cached mass 1 - P(tail) -> 1. Its student gradient is the full one
    on the k tokens; inside the tail it moves the student's mass towards P(tail) without reshaping it.
    """
    k, v = t.ids.shape[-1], s.shape[-1]
    # masked rows: a uniform coarse teacher on the first k tokens (finite everywhere; their terms are dropped)
    uniform = -float(np.log(k + (k < v)))
    ids = jnp.where(keep[..., None], t.ids.astype(jnp.int32), jnp.arange(k, dtype=jnp.int32))
    lt = jnp.where(keep[..., None], t.logp.astype(jnp.float32), uniform)
    ls_k = jnp.take_along_axis(ls, ids, axis=-1)
    if k < v:
        ls_tail = _log_mass_outside(ls, ids)
        tail = jnp.where(keep, t.tail.astype(jnp.float32), uniform)
        lt, ls_k = jnp.concatenate([lt, tail[..., None]], -1), jnp.concatenate([ls_k, ls_tail[..., None]], -1)
    pt = jnp.exp(lt)
    lt0 = jnp.where(pt > 0, lt, 0.0)  # 0 * log 0 = 0, with no NaN in value or gradient
    if divergence == "forward_kl":
        kd = jnp.sum(pt * (lt0 - ls_k), axis=-1)
    elif divergence == "reverse_kl":
        kd = jnp.sum(jnp.exp(ls_k) * (ls_k - lt), axis=-1)
    else:
        beta = jnp.asarray(beta, jnp.float32)
        lm = jnp.logaddexp(jnp.log(beta) + lt, jnp.log1p(-beta) + ls_k)
        kd = (beta * jnp.sum(pt * (lt0 - jnp.where(pt > 0, lm, 0.0)), axis=-1)
              + (1.0 - beta) * jnp.sum(jnp.exp(ls_k) * (ls_k - lm), axis=-1))
    agree = (jnp.argmax(s, axis=-1) == ids[..., 0]).astype(jnp.float32)
    return kd, agree


def _token_terms(s_logits, t_logits, labels, mask, temperature, divergence, beta):
    """Per-token divergence, cross-entropy and argmax agreement [...], each zero where mask is 0 (and the divergence
    and agreement zero everywhere when t_logits is None).

    Rows with mask 0 are replaced by zeros before any arithmetic, so inf/NaN/huge logits in padding can
    poison neither the value nor the gradient.
    """
    sparse = isinstance(t_logits, TopK)
    if not sparse:
        s_logits, t_logits = _shared_vocab(s_logits, t_logits)
    keep = mask > 0
    m = mask.astype(jnp.float32)
    s = jnp.where(keep[..., None], s_logits.astype(jnp.float32), 0.0)
    t_is_one = isinstance(temperature, (int, float)) and temperature == 1
    ls1 = jax.nn.log_softmax(s, axis=-1)
    label = jnp.where(keep, labels, 0).astype(jnp.int32)
    ce = -jnp.take_along_axis(ls1, label[..., None], axis=-1)[..., 0] * m
    if t_logits is None:
        return jnp.zeros_like(ce), ce, jnp.zeros_like(ce)
    if sparse:
        ls = ls1 if t_is_one else jax.nn.log_softmax(s / temperature, axis=-1)
        kd, agree = _sparse_teacher_terms(s, ls, t_logits, keep, divergence, beta)
        return kd * m, ce, agree * m
    t = jnp.where(keep[..., None], jax.lax.stop_gradient(t_logits).astype(jnp.float32), 0.0)
    ls = ls1 if t_is_one else jax.nn.log_softmax(s / temperature, axis=-1)
    lt = jax.nn.log_softmax(t / temperature, axis=-1)
    if divergence == "forward_kl":
        kd = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
    elif divergence == "reverse_kl":
        kd = jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)
    else:
        beta = jnp.asarray(beta, jnp.float32)
        lm = jnp.logaddexp(jnp.log(beta) + lt, jnp.log1p(-beta) + ls)  # log M, without forming M
        kd = (beta * jnp.sum(jnp.exp(lt) * (lt - lm), axis=-1)
              + (1.0 - beta) * jnp.sum(jnp.exp(ls) * (ls - lm), axis=-1))
    agree = (jnp.argmax(s, axis=-1) == jnp.argmax(t, axis=-1)).astype(jnp.float32)
    return kd * m, ce, agree * m


def _normalizer(mask, normalizer):
    n = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0) if normalizer is None else normalizer
    return jax.lax.stop_gradient(jnp.asarray(n, jnp.float32))


def _combine(kd_sum, ce_sum, agree_sum, tokens, n, alpha, temperature):
    kd, lm = kd_sum / n, ce_sum / n
    loss = alpha * temperature ** 2 * kd + (1.0 - alpha) * lm
    return loss, {"loss": loss, "kd": kd, "lm": lm, "agreement": agree_sum / n, "tokens": tokens}


def distill_loss(student_logits, teacher_logits, labels, mask, alpha=0.5, temperature=1.0, divergence="forward_kl",
                 beta=0.5, normalizer=None):
    """Distillation loss on full logits (the reference form). Returns (loss, metrics).

    student_logits [B, T, Vs], teacher_logits [B, T, Vt] (any float dtype; computed in float32, over the shared
    first min(Vs, Vt) entries); labels [B, T] int, the target of logits[b, t] (already shifted); mask [B, T], 1 for
    counted tokens (padding rows may hold any labels and any logits, inf and NaN included).

        loss = alpha * T**2 * kd + (1 - alpha) * lm
        kd   = sum_masked D(P_teacher || P_student) / normalizer,  P_x = softmax(x_logits / T)
        lm   = sum_masked -log softmax(student_logits)[label] / normalizer   (cross-entropy at T = 1)

    The T**2 factor keeps the divergence's gradient magnitude comparable across temperatures, since the
    softened gradients shrink as 1/T**2 (Hinton et al. 2015, "Distilling the knowledge in a neural network").

    divergence:
      "forward_kl": KL(P_teacher || P_student) = sum P_t (log P_t - log P_s); mode-covering, the classic KD loss.
      "reverse_kl": KL(P_student || P_teacher); mode-seeking.
      "jsd": generalized Jensen-Shannon with mixture M = beta * P_teacher + (1 - beta) * P_student,
             JSD = beta * KL(P_teacher || M) + (1 - beta) * KL(P_student || M)   (as in GKD, Agarwal et al. 2024).
             beta weighs the teacher. beta = 0.5 is the symmetric Jensen-Shannon divergence (at most log 2).
             JSD -> 0 as beta -> 0 or 1, to first order JSD ~= beta * KL(P_teacher || P_student) for beta -> 0
             and JSD ~= (1 - beta) * KL(P_student || P_teacher) for beta -> 1; so JSD / beta tends to forward_kl
             and JSD / (1 - beta) to reverse_kl. Needs 0 < beta < 1.

    normalizer: the count to divide by, default mask.sum() (at least 1). A caller accumulating micro-batches passes
    the global token count, so the micro-batch losses and metrics add up to the global means.

    The teacher is a constant (stop_gradient); gradients flow to student_logits only. teacher_logits=None (with
    alpha=0) is plain next-token cross-entropy over the student's whole vocabulary; kd and agreement are then 0.
    metrics: "loss"; "kd" and "lm", the two unweighted terms; "agreement", the masked fraction of tokens where
    argmax student == argmax teacher (over normalizer); "tokens", mask.sum() of this call.
    """
    _check(divergence, beta, alpha, teacher_logits is not None)
    kd, ce, agree = _token_terms(student_logits, teacher_logits, labels, mask, temperature, divergence, beta)
    tokens = jnp.sum(mask.astype(jnp.float32))
    metrics = jax.lax.stop_gradient((jnp.sum(agree), tokens))
    return _combine(jnp.sum(kd), jnp.sum(ce), metrics[0], metrics[1], _normalizer(mask, normalizer),
                    alpha, temperature)


def chunked_distill_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, mask, *, alpha=0.5,
                         temperature=1.0, divergence="forward_kl", beta=0.5, chunk_size=128, normalizer=None,
                         student_head_vd=False, teacher_head_vd=False):
    """`distill_loss(student_hidden @ student_head, teacher_hidden @ teacher_head, ...)`, chunk by chunk.

    student_hidden [B, T, Ds], student_head [Ds, Vs], teacher_hidden [B, T, Dt], teacher_head [Dt, Vt] (bf16 or
    float32; logits are float32 via preferred_element_type); labels, mask, alpha, temperature, divergence, beta and
    normalizer as in `distill_loss`. The sequence is cut into chunks of `chunk_size` time steps (the last one padded
    with mask 0 when T is not a multiple); each chunk computes both heads, its loss and, when differentiated, its
    gradient with respect to its student hidden states, so neither pass holds [B, T, V] float32 logits.

    student_head_vd / teacher_head_vd: that head is given vocabulary-major, [V, D] (a tied input embedding, as
    `transformer.lm_head` returns it), and is used as it is: transposing a tied embedding outside the chunk loop
    would make XLA materialize a [D, V] copy of it.

    teacher_hidden = teacher_head = None (with alpha=0): cross-entropy only, no teacher head is computed.
    Gradients flow to student_hidden only (heads, teacher and hyperparameters are constants). The backward pass
    scales a stored gradient [B, T, Ds] by the incoming cotangent: no recompute. Returns (loss, metrics) with the
    metrics of `distill_loss` (not differentiated).
    """
    _check(divergence, beta, alpha, teacher_hidden is not None)
    c = max(1, min(chunk_size, student_hidden.shape[1]))
    mask = jnp.asarray(mask)
    n = _normalizer(mask, normalizer)
    student_head, teacher_head = jax.lax.stop_gradient((student_head, teacher_head))
    # Under a mesh, each device computes the logits of its own rows with the whole (gathered) head; the hidden
    # states stay split by rows only (sharding.constrain_batch explains why this needs saying).
    student_head = gathered(student_head, ("vocab", "embed") if student_head_vd else ("embed", "vocab"))
    student_hidden = constrain_batch(student_hidden)
    if teacher_head is not None:
        teacher_head = gathered(teacher_head, ("vocab", "embed") if teacher_head_vd else ("embed", "vocab"))
        teacher_hidden = constrain_batch(teacher_hidden)
    if teacher_head is not None:
        v = min(student_head.shape[0 if student_head_vd else 1], teacher_head.shape[0 if teacher_head_vd else 1])
        student_head = quant.vocab_slice(student_head, v, student_head_vd)
        teacher_head = quant.vocab_slice(teacher_head, v, teacher_head_vd)
    teacher_hidden = None if teacher_hidden is None else _to_chunks(jax.lax.stop_gradient(teacher_hidden), c)
    # A Python temperature stays static, so at T = 1 one student log-softmax serves both terms.
    static_temperature = float(temperature) if isinstance(temperature, (int, float)) else None
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    kind = (divergence, bool(student_head_vd), bool(teacher_head_vd))
    return _chunked(kind, c, static_temperature, student_hidden, student_head, teacher_hidden, teacher_head,
                    _to_chunks(jnp.asarray(labels), c), _to_chunks(mask, c), n, f32(alpha), f32(temperature),
                    f32(beta))


def cached_distill_loss(student_hidden, student_head, teacher: TopK, labels, mask, *, vocab: int, alpha=0.5,
                        temperature=1.0, divergence="forward_kl", beta=0.5, chunk_size=128, normalizer=None,
                        student_head_vd=False):
    """`chunked_distill_loss` against a teacher read from a top-k cache instead of computed: `teacher` a `TopK` of
    [B, T, k] ids and log-probabilities and [B, T] tail log-masses, over the first `vocab` tokens (the vocabulary
    the cache was written for; the student's head is cut to it). The divergence is taken between the coarse
    distributions over the k tokens plus one tail bucket (`_sparse_teacher_terms` states its error for k < vocab;
    with k = vocab it is the full divergence). CE and the metrics are as in `chunked_distill_loss` ("agreement"
    compares with the teacher's top token)."""
    _check(divergence, beta, alpha, True)
    c = max(1, min(chunk_size, student_hidden.shape[1]))
    mask = jnp.asarray(mask)
    n = _normalizer(mask, normalizer)
    student_head = gathered(jax.lax.stop_gradient(student_head),
                            ("vocab", "embed") if student_head_vd else ("embed", "vocab"))
    if student_head.shape[0 if student_head_vd else 1] < vocab:
        raise FaJaxError(f"the student's vocabulary ({student_head.shape[0 if student_head_vd else 1]} tokens) is "
                         f"smaller than the teacher cache's ({vocab})")
    student_head = student_head[:vocab] if student_head_vd else student_head[:, :vocab]
    student_hidden = constrain_batch(student_hidden)
    teacher = jax.tree.map(lambda x: _to_chunks(constrain_batch(jax.lax.stop_gradient(x)), c), teacher)
    static_temperature = float(temperature) if isinstance(temperature, (int, float)) else None
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    kind = (divergence, bool(student_head_vd), False)
    return _chunked(kind, c, static_temperature, student_hidden, student_head, teacher, None,
                    _to_chunks(jnp.asarray(labels), c), _to_chunks(mask, c), n, f32(alpha), f32(temperature),
                    f32(beta))


def teacher_topk(hidden, head, *, vocab: int, k: int, temperature=1.0, chunk_size=128, head_vd=False) -> TopK:
    """The teacher's distribution at `temperature` over the first `vocab` tokens, as a `TopK` (float32 [B, T, k]
    log-probabilities of its k most probable tokens, most probable first, int32 ids, [B, T] tail log-masses),
    computed from hidden states [B, T, D] and the LM head chunk by chunk (no [B, T, V] logits). The tail is the
    log-sum-exp of the other tokens' log-probabilities, not log(1 - sum): exact however much the top k hold."""
    head = jax.lax.stop_gradient(head)
    head = head[:vocab] if head_vd else head[:, :vocab]
    B, T = hidden.shape[:2]
    c = max(1, min(chunk_size, T))

    def chunk(h):
        lt = jax.nn.log_softmax(_head(h, head, head_vd) / temperature, axis=-1)  # [B, C, V]
        logp, ids = jax.lax.top_k(lt, k)
        if k < lt.shape[-1]:
            tail = _log_mass_outside(lt, ids)
        else:
            tail = jnp.full(lt.shape[:-1], -jnp.inf)
        return ids, logp, tail

    out = jax.lax.map(chunk, _to_chunks(constrain_batch(jax.lax.stop_gradient(hidden)), c))
    return TopK(*(jnp.moveaxis(x, 0, 1).reshape(B, -1, *x.shape[3:])[:, :T] for x in out))


def _to_chunks(x, c):
    """[B, T, ...] -> [N, B, C, ...], the time axis padded with zeros to a multiple of c."""
    x = jnp.pad(x, [(0, 0), (0, -x.shape[1] % c)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], -1, c, *x.shape[2:]), 1, 0)


def _head(h, head, vd):
    spec = "bcd,vd->bcv" if vd else "bcd,dv->bcv"
    return quant.einsum(spec, h, head, preferred_element_type=jnp.float32)  # head: an array or a quant.QInt8


def chunked_token_terms(student_hidden, student_head, teacher_hidden, teacher_head, labels, mask, *,
                        temperature=1.0, divergence="forward_kl", beta=0.5, chunk_size=128, student_head_vd=False,
                        teacher_head_vd=False):
    """The per-token terms behind `chunked_distill_loss`'s metrics, for evaluation: float32 [B, T, 3] holding
    (divergence, argmax agreement, cross-entropy) of each token, 0 where mask is 0 (divergence and agreement 0
    everywhere without a teacher). Arguments as in `chunked_distill_loss`; computed chunk by chunk in the same way,
    so [B, T, V] logits never exist; not differentiable. Summing over tokens gives `chunked_distill_loss`'s kd,
    agreement and lm metrics at normalizer 1; keeping the tokens apart lets a caller sum per document."""
    _check(divergence, beta, 0.0, teacher_hidden is not None)
    B, T = student_hidden.shape[:2]
    c = max(1, min(chunk_size, T))

    def chunk(xs):
        hs, ht, lab, m = xs
        t = None if ht is None else _head(ht, teacher_head, teacher_head_vd)
        kd, ce, agree = _token_terms(_head(hs, student_head, student_head_vd), t, lab, m, temperature, divergence,
                                     beta)
        return jnp.stack([kd, agree, ce], axis=-1)  # [B, C, 3]

    xs = (_to_chunks(student_hidden, c), None if teacher_hidden is None else _to_chunks(teacher_hidden, c),
          _to_chunks(jnp.asarray(labels), c), _to_chunks(jnp.asarray(mask), c))
    out = jax.lax.map(chunk, jax.lax.stop_gradient(xs))  # [N, B, C, 3]
    return jnp.moveaxis(out, 0, 1).reshape(B, -1, 3)[:, :T]


def _chunk_loss(kind, hs, head_s, ht, head_t, labels, mask, n, alpha, temperature, beta):
    """Loss contribution of one chunk hs [B, C, Ds], with (kd, ce, agreement) sums as aux.

    kind = (divergence, student head is [V, D], teacher head is [V, D])."""
    divergence, s_vd, t_vd = kind
    s = _head(hs, head_s, s_vd)
    t = ht if ht is None or isinstance(ht, TopK) else _head(ht, head_t, t_vd)
    kd, ce, agree = _token_terms(s, t, labels, mask, temperature, divergence, beta)
    kd, ce, agree = jnp.sum(kd), jnp.sum(ce), jnp.sum(agree)
    return (alpha * temperature ** 2 * kd + (1.0 - alpha) * ce) / n, (kd, ce, agree)


def _scan_chunks(kind, with_grad, hs_chunks, head_s, ht_chunks, head_t, label_chunks, mask_chunks, n, alpha,
                 temperature, beta):
    """Sums of (kd, ce, agreement) over chunks, and the per-chunk grads [N, B, C, Ds] when with_grad."""
    def body(sums, xs):
        hs, ht, labels, mask = xs
        f = functools.partial(_chunk_loss, kind, head_s=head_s, ht=ht, head_t=head_t, labels=labels,
                              mask=mask, n=n, alpha=alpha, temperature=temperature, beta=beta)
        if with_grad:
            _, vjp, aux = jax.vjp(f, hs, has_aux=True)
            grad = vjp(jnp.ones((), jnp.float32))[0]
        else:
            aux, grad = f(hs)[1], None
        return jax.tree.map(jnp.add, sums, aux), grad

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(body, (zero, zero, zero), (hs_chunks, ht_chunks, label_chunks, mask_chunks))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked(kind, c, static_temperature, student_hidden, head_s, ht_chunks, head_t, label_chunks, mask_chunks,
             n, alpha, temperature, beta):
    temperature = temperature if static_temperature is None else static_temperature
    (kd, ce, agree), _ = _scan_chunks(kind, False, _to_chunks(student_hidden, c), head_s, ht_chunks, head_t,
                                      label_chunks, mask_chunks, n, alpha, temperature, beta)
    return _combine(kd, ce, agree, jnp.sum(mask_chunks.astype(jnp.float32)), n, alpha, temperature)


def _chunked_fwd(kind, c, static_temperature, student_hidden, head_s, ht_chunks, head_t, label_chunks,
                 mask_chunks, n, alpha, temperature, beta):
    temperature = temperature if static_temperature is None else static_temperature
    (kd, ce, agree), grads = _scan_chunks(kind, True, _to_chunks(student_hidden, c), head_s, ht_chunks,
                                          head_t, label_chunks, mask_chunks, n, alpha, temperature, beta)
    out = _combine(kd, ce, agree, jnp.sum(mask_chunks.astype(jnp.float32)), n, alpha, temperature)
    b, t, d = student_hidden.shape
    return out, jnp.moveaxis(grads, 0, 1).reshape(b, -1, d)[:, :t]  # [N, B, C, Ds] -> [B, T, Ds]


def _chunked_bwd(kind, c, static_temperature, grads, cotangent):
    # Only the loss is differentiable; the metrics' cotangents are ignored.
    return (grads * cotangent[0].astype(grads.dtype),) + (None,) * 9


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
