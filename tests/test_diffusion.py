"""hybridrag.diffusion: schedules, the embedding DDPM/DDIM on a conditional Gaussian mixture, classifier-free
guidance, the masked diffusion LM on a trivial conditional pattern, quality filtering, precision/recall and the
Frechet distance on known cases, the hand-over to a knowledge base and a ContinualLearner, and bad input."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridrag.diffusion import (DiffusionConfig, EmbeddingDiffusion, MaskedDiffusionLM, TextDiffusionConfig,
                                 cosine_alpha_bar, ddim_timesteps, filter_samples, frechet_distance, hand_over,
                                 linear_beta_schedule, make_schedule, precision_recall, synthetic_ids,
                                 train_embedding_diffusion, train_text_diffusion)

pytestmark = pytest.mark.usefixtures("one_thread")

K, D, SPREAD = 4, 8, 0.3  # mixture components, dimension, per-coordinate standard deviation
T = 1000


def _mixture_means():
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, K, generator=generator))[0].T  # (K, D) orthonormal rows
    return 3.0 * basis  # pairwise squared distance 18


def _draw(means, n, seed):
    generator = torch.Generator().manual_seed(seed)
    component = torch.randint(0, K, (n,), generator=generator)
    return means[component] + SPREAD * torch.randn(n, D, generator=generator), component


def _config(**changes):
    values = dict(dim=D, hidden_dim=64, num_layers=2, timesteps=T, condition_dropout=0.2, sampling_steps=20)
    return DiffusionConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def mixture(one_thread):
    """(means (K, D), a trained model, an untrained copy, its loss history): conditions are the component means."""
    means = _mixture_means()
    x, component = _draw(means, 2048, seed=1)
    torch.manual_seed(0)
    untrained = EmbeddingDiffusion(_config())
    model = EmbeddingDiffusion(_config())
    model.load_state_dict(untrained.state_dict())
    history = train_embedding_diffusion(model, x, means[component], steps=400, batch_size=128, lr=2e-3,
                                        progress=False)
    untrained.fit_statistics(x)
    return means, model, untrained.eval(), history


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_decreases_from_near_one_to_near_zero(kind):
    schedule = make_schedule(kind, T)
    bars = schedule.alpha_bars
    assert bars.shape == (T,) and bars.dtype == torch.float64
    assert bool((bars[1:] < bars[:-1]).all()), "alpha_bar must decrease strictly"
    assert 1 > bars[0] > 0.99
    assert 0 < bars[-1] < 1e-4
    torch.testing.assert_close(bars, torch.cumprod(1 - schedule.betas, 0), rtol=1e-12, atol=0)
    assert bool(((schedule.betas > 0) & (schedule.betas < 1)).all())


def test_linear_and_cosine_shapes():
    betas = linear_beta_schedule(T, 1e-4, 0.02)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    torch.testing.assert_close(betas[1:] - betas[:-1], torch.full((T - 1,), (0.02 - 1e-4) / (T - 1),
                                                                  dtype=torch.float64))
    linear, cosine = make_schedule("linear", T).alpha_bars, make_schedule("cosine", T).alpha_bars
    # the cosine schedule keeps about half the signal power at mid-way; the linear one has destroyed most of it
    assert 0.45 < cosine[T // 2] < 0.55
    assert linear[T // 2] < 0.1
    # cosine's alpha_bar is cos^2 of the time, f(t + 1) / f(0), until the 0.999 clip on the last betas
    f = cosine_alpha_bar(T)
    torch.testing.assert_close(cosine[:T - 2], f[1:T - 1], rtol=1e-10, atol=0)
    assert bool((cosine > linear)[:990].all()), "cosine keeps more signal than linear until the last steps"
    assert cosine[-1] < 1e-3 * linear[-1]  # and ends far nearer 0


@pytest.mark.parametrize("steps", [1, 3, 7, 20, 333, 999, 1000])
def test_ddim_timesteps_are_distinct_descending_and_start_at_t_minus_one(steps):
    sequence = ddim_timesteps(T, steps)
    assert sequence.shape == (steps,) and sequence[0] == T - 1 and sequence[-1] >= 0
    assert bool((sequence[1:] < sequence[:-1]).all())
    if steps == T:
        assert sequence.tolist() == list(range(T - 1, -1, -1))


# ---------------------------------------------------------------- embedding diffusion


def test_training_brings_the_loss_down(mixture):
    history = mixture[3]
    first, last = np.mean(history[:20]), np.mean(history[-50:])
    assert last < 0.5 * first, (first, last)


def test_ddim_samples_land_on_their_component(mixture):
    means, model, untrained, _ = mixture
    trace = D * SPREAD ** 2  # the total variance of one component: a sample set collapsed to the mean has FD = 0.72
    for k in range(K):
        real = means[k] + SPREAD * torch.randn(500, D, generator=torch.Generator().manual_seed(20 + k))
        condition = means[k].expand(500, D)
        fake = model.sample(condition, generator=torch.Generator().manual_seed(3))
        before = untrained.sample(condition, generator=torch.Generator().manual_seed(3))
        distance = frechet_distance(real, fake)
        assert distance < 0.4 * trace, (k, distance)
        assert distance < 1e-3 * frechet_distance(real, before)
        other = means[(k + 1) % K] + SPREAD * torch.randn(500, D, generator=torch.Generator().manual_seed(30 + k))
        assert frechet_distance(other, fake) > 10  # the wrong component is 18 away
        scores = precision_recall(real, fake, k=3)
        assert scores["precision"] > 0.75 and scores["recall"] > 0.4, (k, scores)
        assert precision_recall(real, before, k=3)["precision"] < 0.05


def test_ancestral_ddpm_sampling_eta_one_all_steps(mixture):
    means, model, _, _ = mixture
    real = means[2] + SPREAD * torch.randn(300, D, generator=torch.Generator().manual_seed(4))
    fake = model.sample(means[2].expand(300, D), num_steps=T, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert frechet_distance(real, fake) < 0.4 * D * SPREAD ** 2


def test_ddim_with_eta_zero_is_deterministic_given_the_noise(mixture):
    means, model, _, _ = mixture
    condition = means[torch.arange(16) % K]
    noise = torch.randn(16, D, generator=torch.Generator().manual_seed(6))
    first = model.sample(condition, eta=0.0, noise=noise)
    again = model.sample(condition, eta=0.0, noise=noise.clone(), generator=torch.Generator().manual_seed(99))
    assert torch.equal(first, again)
    other = model.sample(condition, eta=0.0, noise=torch.randn(16, D, generator=torch.Generator().manual_seed(7)))
    assert (first - other).abs().max() > 1e-3
    noisy = [model.sample(condition, eta=1.0, noise=noise, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert (noisy[0] - noisy[1]).abs().max() > 1e-3  # eta > 0 adds fresh noise every step


def test_sample_trajectory_has_one_state_per_step(mixture):
    means, model, _, _ = mixture
    samples, trajectory = model.sample(means[:2], num_steps=5, return_trajectory=True)
    assert samples.shape == (2, D) and len(trajectory) == 6
    torch.testing.assert_close(samples, trajectory[-1] * model.scale + model.shift)


def test_guidance_moves_samples_toward_the_condition(mixture):
    means, model, _, _ = mixture
    component = torch.arange(400) % K
    condition = means[component]
    similarity, accuracy = [], []
    for w in (0.0, 0.5, 1.0, 2.0):
        samples = model.sample(condition, guidance_scale=w, generator=torch.Generator().manual_seed(8))
        similarity.append(float(F.cosine_similarity(samples, condition).mean()))
        accuracy.append(float((torch.cdist(samples, means).argmin(dim=1) == component).double().mean()))
    assert similarity[0] < 0.5 and accuracy[0] < 0.5, (similarity, accuracy)  # unconditional: any component
    assert similarity[0] < similarity[1] - 0.1 < similarity[2] - 0.15, similarity
    assert similarity[3] > similarity[2], similarity
    assert accuracy[2] > 0.95 and accuracy[3] >= accuracy[2], accuracy


@pytest.mark.parametrize("schedule, prediction, clip", [("cosine", "v", None), ("cosine", "epsilon", 3.0),
                                                         ("linear", "x0", None)])
def test_other_schedules_and_predictions_train_and_sample(schedule, prediction, clip):
    means = _mixture_means()
    x, component = _draw(means, 1024, seed=11)
    torch.manual_seed(0)
    model = EmbeddingDiffusion(_config(schedule=schedule, prediction=prediction, clip_x0=clip))
    history = train_embedding_diffusion(model, x, means[component], steps=150, batch_size=128, lr=3e-3,
                                        progress=False)
    assert np.mean(history[-30:]) < np.mean(history[:10])
    samples = model.sample(means[component[:200]], generator=torch.Generator().manual_seed(1))
    assert float((torch.cdist(samples, means).argmin(dim=1) == component[:200]).double().mean()) > 0.9


# ---------------------------------------------------------------- text diffusion


def test_masked_diffusion_lm_learns_a_conditional_pattern():
    vocab, length = 12, 6
    start = torch.randint(0, 6, (512, 1), generator=torch.Generator().manual_seed(0))
    targets = (start + torch.arange(length)) % vocab  # condition token a -> a, a + 1, ..., a + 5
    torch.manual_seed(0)
    model = MaskedDiffusionLM(TextDiffusionConfig(vocab_size=vocab, max_length=8, hidden_dim=32, num_layers=2,
                                                  num_heads=2, sampling_steps=length))
    before = model.loss(targets[:256], start[:256], generator=torch.Generator().manual_seed(5)).item()
    history = train_text_diffusion(model, targets, start, steps=200, batch_size=64, lr=3e-3, progress=False)
    after = model.loss(targets[:256], start[:256], generator=torch.Generator().manual_seed(5)).item()
    assert after < 0.1 * before, (before, after)
    assert np.mean(history[-20:]) < 0.2 * np.mean(history[:20])
    condition = torch.arange(6)[:, None]
    expected = (condition + torch.arange(length)) % vocab
    for steps in (length, 2, 1, 50):
        out = model.generate(condition, length=length, num_steps=steps)
        assert out.shape == (6, length) and out.dtype == torch.int64
        assert not bool((out == model.mask_token_id).any())
        assert float((out == expected).all(dim=1).double().mean()) >= 5 / 6, (steps, out)
    shuffled = model.generate(condition, length=length, num_steps=length, order="random",
                              generator=torch.Generator().manual_seed(2))  # positions fixed in a random order
    assert float((shuffled == expected).all(dim=1).double().mean()) >= 5 / 6, shuffled
    sampled = model.generate(condition, length=length, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert not bool((sampled == model.mask_token_id).any()) and sampled.shape == (6, length)


def test_masked_diffusion_lm_with_a_condition_vector():
    vocab, length = 10, 5
    model = MaskedDiffusionLM(TextDiffusionConfig(vocab_size=vocab, max_length=8, hidden_dim=32, num_layers=1,
                                                  num_heads=2, condition_dim=3))
    condition = torch.randn(4, 3)
    prefix = torch.randint(0, vocab, (4, 2))
    out = model.generate(condition, length=length, num_steps=3, condition_ids=prefix)
    assert out.shape == (4, length) and int(out.max()) < vocab and int(out.min()) >= 0
    assert model.generate(batch_size=3, length=2, num_steps=2).shape == (3, 2)
    targets = torch.randint(0, vocab, (4, length))
    loss = model.loss(targets, prefix, condition)
    assert loss.shape == () and math.isfinite(loss.item())
    loss.backward()
    assert model.condition.weight.grad is not None and model.condition.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- quality and metrics


def test_precision_recall_and_frechet_distance_on_identical_sets():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone(), k=3) == {"precision": 1.0, "recall": 1.0}
    assert frechet_distance(x, x.clone()) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_shifted_and_scaled_sets():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * torch.tensor(
        [1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    # equal covariances: FD = |mean shift|^2
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-9)
    # scaled copy: C_f = s^2 C_r, so the covariance term is (1 - s)^2 Tr C_r
    covariance = torch.cov(x.T)
    assert frechet_distance(x, 3.0 * x) == pytest.approx(
        float(4.0 * covariance.trace() + (2.0 * x.mean(0)).pow(2).sum()), rel=1e-9)
    # far apart in every way: agree with the textbook formula through scipy's sqrtm
    linalg = pytest.importorskip("scipy.linalg")
    y = torch.randn(400, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64) @ torch.randn(
        5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 1.0
    a, b = x.numpy(), y.numpy()
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(x, y) == pytest.approx(reference, rel=1e-7)
    assert frechet_distance(x.numpy(), y.float()) == pytest.approx(reference, rel=1e-5)


def test_frechet_distance_with_more_dimensions_than_rows():
    x = torch.randn(10, 40, generator=torch.Generator().manual_seed(4))
    assert frechet_distance(x, x + 1.0) == pytest.approx(40.0, rel=1e-6)  # singular covariances, no offset needed


def test_precision_recall_on_hand_computed_cases():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: 1 each
    fake = torch.tensor([[0.5], [5.0]])  # 0.5 is in, 5 is 2 from 3: out; fake radii 4.5 cover every real point
    assert precision_recall(real, fake, k=1) == {"precision": 0.5, "recall": 1.0}
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(5))
    far = x + 100.0
    assert precision_recall(x, far, k=3) == {"precision": 0.0, "recall": 0.0}
    half = torch.cat([x[:50], far[:50]])
    assert precision_recall(x, half, k=3)["precision"] == 0.5


def test_filter_samples_accepts_and_rejects_as_set():
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    samples = torch.stack([e1, (e1 + e2) / 2 ** 0.5, e2, -e1]) * torch.tensor([[2.0], [1.0], [3.0], [0.5]])
    corpus = torch.stack([e1, torch.eye(3)[2]])
    everything = filter_samples(samples, e1, corpus)
    assert everything.accepted.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(everything.similarity, torch.tensor([1.0, 0.5 ** 0.5, 0.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(everything.corpus_similarity,
                               torch.tensor([1.0, 0.5 ** 0.5, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(everything.score, torch.tensor([0.0, 0.5 ** 0.5 * (1 - 0.5 ** 0.5), 0.0, -1.0],
                                                              dtype=torch.float64))
    assert filter_samples(samples, e1, corpus, min_similarity=0.5).accepted.tolist() == [0, 1]
    assert filter_samples(samples, e1, corpus, max_corpus_similarity=0.9).accepted.tolist() == [1, 2, 3]
    assert filter_samples(samples, e1, corpus, min_similarity=0.5, max_corpus_similarity=0.9).accepted.tolist() == [1]
    assert filter_samples(samples, e1, corpus, threshold=0.1).accepted.tolist() == [1]
    assert filter_samples(samples, e1, corpus, threshold=0.3).accepted.tolist() == []
    per_row = filter_samples(samples, torch.stack([e2, e2, e2, -e1]), min_similarity=0.9)
    assert per_row.accepted.tolist() == [2, 3] and bool(torch.isinf(per_row.corpus_similarity).all())
    torch.testing.assert_close(per_row.score, per_row.similarity)


def test_the_copy_test_bound_follows_the_corpus_density():
    # a dense pair of corpus vectors (cosine 0.98 to each other) and an isolated one
    corpus = torch.tensor([[1.0, 0.0, 0.0], [0.98, 0.199, 0.0], [0.0, 0.0, 1.0]])
    pair = float(torch.nn.functional.cosine_similarity(corpus[0], corpus[1], dim=0))
    samples = torch.tensor([[1.0, -0.25, 0.0],   # beside the dense pair, less close to row 0 than row 1 is: new
                            [1.0, 0.0, 0.001],   # on top of corpus row 0: a copy
                            [0.0, 0.3, 1.0],     # 0.96 to the isolated row, whose nearest other row is at 0: a copy
                            [0.0, 1.0, 0.0]])    # far from all: new
    result = filter_samples(samples, torch.ones(3), corpus, authentic=True)
    assert result.accepted.tolist() == [0, 3]
    torch.testing.assert_close(result.copy_bound, torch.tensor([pair, pair, 0.0, pair], dtype=torch.float64))
    # one fixed novelty bound cannot do the same: 0.99 lets the near-copy of the isolated row in
    assert filter_samples(samples, torch.ones(3), corpus, max_corpus_similarity=0.99).accepted.tolist() == [0, 2, 3]
    assert bool(torch.isnan(filter_samples(samples, torch.ones(3), corpus).copy_bound).all())
    # neighbour similarities of the whole store, given for a corpus that is part of it
    given = filter_samples(samples, torch.ones(3), corpus, authentic=True,
                           corpus_neighbour_similarity=torch.tensor([pair, pair, 0.97]))
    assert given.accepted.tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match=r"corpus_neighbour_similarity must have shape \(3,\)"):
        filter_samples(samples, torch.ones(3), corpus, authentic=True, corpus_neighbour_similarity=torch.ones(2))
    with pytest.raises(ValueError, match=r"values in \[-1, 1\]"):
        filter_samples(samples, torch.ones(3), corpus, authentic=True, corpus_neighbour_similarity=torch.full((3,), 2))
    with pytest.raises(ValueError, match="pass authentic=True with it"):
        filter_samples(samples, torch.ones(3), corpus, corpus_neighbour_similarity=torch.ones(3))
    with pytest.raises(ValueError, match="it needs a corpus of at least 2 rows, got 1"):
        filter_samples(samples, torch.ones(3), corpus[:1], authentic=True)
    with pytest.raises(ValueError, match="it needs a corpus of at least 2 rows, got none"):
        filter_samples(samples, torch.ones(3), authentic=True)
    with pytest.raises(TypeError, match="authentic must be True or False, got 1"):
        filter_samples(samples, torch.ones(3), corpus, authentic=1)


def test_filter_generated_samples_by_their_condition(mixture):
    means, model, _, _ = mixture
    condition = means[torch.arange(40) % K]
    samples = model.sample(condition, generator=torch.Generator().manual_seed(9))
    shuffled = condition[torch.arange(40).roll(1)]  # every sample judged against another component
    assert len(filter_samples(samples, condition, min_similarity=0.8).accepted) >= 36
    assert len(filter_samples(samples, shuffled, min_similarity=0.8).accepted) <= 4
    # novelty: against a corpus that already holds these very vectors nothing is new
    assert len(filter_samples(samples, condition, samples[:20], max_corpus_similarity=0.999).accepted) <= 20


# ---------------------------------------------------------------- hand-over


def test_hand_over_to_a_knowledge_base_and_a_continual_learner():
    pytest.importorskip("faiss")
    pytest.importorskip("bm25s")
    from hybridrag.retention import ContinualLearner
    from hybridrag.retrieval import Document, HashingEncoder, KnowledgeBase, NeuralRetriever

    kb = KnowledgeBase.build([Document("real", "an existing passage about rivers")], HashingEncoder(64))
    learner = ContinualLearner(NeuralRetriever(input_dim=4), buffer_size=16, batch_size=2)
    samples = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.9, 0.1, 0, 0]])
    conditions = torch.tensor([[1.0, 0, 0, 0]] * 3)
    result = filter_samples(samples, conditions, min_similarity=0.9)
    assert result.accepted.tolist() == [0, 2]
    texts = ["synthetic passage one", "rejected passage", "synthetic passage two"]
    out = hand_over(result, texts=texts, samples=samples, conditions=conditions, knowledge_base=kb, learner=learner,
                    metadata={"generator": "toy"})
    assert out == {"document_ids": ["synthetic-0", "synthetic-1"], "observed": 2, "dropped": 0}
    assert synthetic_ids(kb) == ["synthetic-0", "synthetic-1"] and len(kb) == 3 and len(learner) == 2
    document = kb.get("synthetic-1")
    assert document.text == "synthetic passage two" and document.metadata["synthetic"] is True
    assert document.metadata["generator"] == "toy" and document.metadata["similarity"] == pytest.approx(
        float(result.similarity[2]))
    torch.testing.assert_close(learner.buffer[1][1], samples[2])
    assert learner.sources() == {"synthetic": 2} and learner.remove("synthetic") == 2 and len(learner) == 0
    assert hand_over(result, texts=texts, knowledge_base=kb)["document_ids"] == ["synthetic-2", "synthetic-3"]
    assert kb.remove(synthetic_ids(kb)) == 4 and [d.id for d in kb.documents] == ["real"]
    with pytest.raises(ValueError, match="texts.*precomputed vectors"):
        hand_over(result, samples=samples, conditions=conditions, knowledge_base=kb)
    with pytest.raises(ValueError, match="conditions must have shape"):  # the learner's check, before kb changes
        hand_over(result, texts=texts, samples=samples[:, :3], conditions=conditions[:, :3], knowledge_base=kb,
                  learner=learner)
    assert len(kb) == 1


# ---------------------------------------------------------------- configuration and bad input


def test_config_round_trips_and_reads_json(tmp_path):
    config = DiffusionConfig(dim=16, condition_dim=4, schedule="cosine", prediction="v", guidance_scale=2.0)
    assert DiffusionConfig.from_any(config.to_dict()) == config
    path = tmp_path / "diffusion.json"
    path.write_text(json.dumps(config.to_dict()))
    assert DiffusionConfig.from_any(path) == config and DiffusionConfig.from_any(str(path)) == config
    assert DiffusionConfig.from_any(None) == DiffusionConfig() and DiffusionConfig().condition_dim == 384
    text = TextDiffusionConfig(vocab_size=50, condition_dim=8)
    assert TextDiffusionConfig.from_any(text.to_dict()) == text and text.mask_token_id == 50
    with pytest.raises(ValueError, match=r"unknown keys \['steps'\]"):
        DiffusionConfig.from_any({"steps": 3})
    with pytest.raises(TypeError, match="config must be None"):
        DiffusionConfig.from_any(3)


@pytest.mark.parametrize("changes, match", [
    ({"schedule": "quadratic"}, r"schedule must be one of 'linear', 'cosine', got 'quadratic'"),
    ({"prediction": "score"}, "prediction must be one of"),
    ({"dim": 0}, r"dim must be an int >= 1, got 0"),
    ({"timesteps": 100}, r"timesteps=100 .* alpha_bar_T = 0.364"),
    ({"schedule": "cosine", "beta_start": 1e-4}, "beta_start applies to schedule='linear' only"),
    ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start must be <= beta_end"),
    ({"beta_end": 1.5}, r"beta_end must be a finite number in \(0.0, 1.0\)"),
    ({"schedule": "cosine"}, r"prediction='epsilon' with the cosine schedule .* 2.03e\+04"),
    ({"condition_dropout": 0.0, "guidance_scale": 2.0}, r"guidance_scale=2.0 needs the unconditional"),
    ({"condition_dropout": 1.0}, r"condition_dropout must be a finite number in \[0.0, 1.0\)"),
    ({"sampling_steps": 0}, "sampling_steps must be an int >= 1, got 0"),
    ({"sampling_steps": 2000}, "sampling_steps must be <= timesteps=1000, got 2000"),
    ({"eta": 2.0}, r"eta must be a finite number in \[0.0, 1.0\], got 2.0"),
    ({"clip_x0": 0.0}, "clip_x0 must be a finite number in"),
])
def test_config_refuses_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**changes)


def test_make_schedule_refuses_unknown_kinds_and_bad_timesteps():
    with pytest.raises(ValueError, match="schedule must be 'linear' or 'cosine', got 'sigmoid'"):
        make_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="timesteps must be an int >= 2, got 1"):
        make_schedule("linear", 1)
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, timesteps=10\], got 0"):
        ddim_timesteps(10, 0)


def test_embedding_model_refuses_bad_input():
    model = EmbeddingDiffusion(_config(dim=4, condition_dim=3))
    x, c = torch.randn(5, 4), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"condition must have shape \(B, condition_dim=3\), got \(5, 4\)"):
        model.sample(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"condition must have shape \(B, condition_dim=3\), got \(5, 2\)"):
        model.loss(x, torch.randn(5, 2))
    with pytest.raises(ValueError, match="condition has 4 rows but x0 has 5"):
        model.loss(x, c[:4])
    with pytest.raises(ValueError, match=r"x0 must have shape \(B, dim=4\)"):
        model.loss(torch.randn(5, 3), c)
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, timesteps=1000\], got 0"):
        model.sample(c, num_steps=0)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        model.sample(c, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="eta must be a finite number"):
        model.sample(c, eta=1.5)
    with pytest.raises(ValueError, match="condition is empty"):
        model.sample(torch.empty(0, 3))
    with pytest.raises(ValueError, match="condition holds NaN"):
        model.sample(torch.full((1, 3), math.nan))
    with pytest.raises(TypeError, match="condition must be a floating-point tensor"):
        model.sample(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="embeddings is empty"):
        train_embedding_diffusion(model, torch.empty(0, 4), torch.empty(0, 3), steps=1, progress=False)
    with pytest.raises(ValueError, match="conditions has 4 rows but embeddings has 5"):
        train_embedding_diffusion(model, x, c[:4], steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be positive, got 0"):
        train_embedding_diffusion(model, x, c, steps=0, progress=False)
    given = torch.optim.SGD(model.parameters(), lr=0.1)
    for options in ({"lr": 1e-2}, {"weight_decay": 0.1}):  # they would be unused: refused, nothing trained
        with pytest.raises(ValueError, match="with optimizer= given they would be unused"):
            train_embedding_diffusion(model, x, c, steps=1, progress=False, optimizer=given, **options)
    assert len(train_embedding_diffusion(model, x, c, steps=2, progress=False, optimizer=given)) == 2
    unguided = EmbeddingDiffusion(_config(dim=4, condition_dim=3, condition_dropout=0.0))
    with pytest.raises(ValueError, match="guidance_scale=3.0 needs the unconditional prediction"):
        unguided.sample(c, guidance_scale=3.0)


def test_text_model_refuses_bad_input():
    model = MaskedDiffusionLM(TextDiffusionConfig(vocab_size=10, max_length=8, hidden_dim=16, num_layers=1,
                                                  num_heads=2))
    prompt = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="num_steps must be positive, got 0"):
        model.generate(prompt, length=4, num_steps=0)
    with pytest.raises(ValueError, match="length must be positive, got 0"):
        model.generate(prompt, length=0)
    with pytest.raises(ValueError, match="need 9 positions, more than max_length=8"):
        model.generate(prompt, length=6)
    with pytest.raises(ValueError, match="condition \\(a vector\\) needs a model built with condition_dim"):
        model.generate(torch.randn(2, 5), length=2)
    with pytest.raises(ValueError, match=r"condition_ids token ids must lie in \[0, 10\), got 0 .. 10"):
        model.generate(torch.tensor([[0, 10]]), length=2)
    with pytest.raises(ValueError, match="targets must have shape"):
        model.loss(torch.empty(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="condition_ids has 1 rows but the batch has 2"):
        model.loss(torch.zeros(2, 4, dtype=torch.long), prompt[:1])
    with pytest.raises(ValueError, match="generate needs a condition, condition_ids or batch_size"):
        model.generate(length=2)
    with pytest.raises(ValueError, match="order must be 'confidence' or 'random', got 'left'"):
        model.generate(prompt, length=2, order="left")
    with pytest.raises(ValueError, match="with optimizer= given they would be unused"):
        train_text_diffusion(model, torch.zeros(2, 4, dtype=torch.long), steps=1, lr=1e-2, progress=False,
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    vectors = MaskedDiffusionLM(TextDiffusionConfig(vocab_size=10, max_length=8, hidden_dim=16, num_layers=1,
                                                    num_heads=2, condition_dim=3))
    with pytest.raises(ValueError, match=r"condition must have shape \(B, condition_dim=3\), got \(2, 4\)"):
        vectors.generate(torch.randn(2, 4), length=2)
    with pytest.raises(ValueError, match="hidden_dim must be divisible by num_heads=3"):
        TextDiffusionConfig(hidden_dim=16, num_heads=3)


def test_metrics_refuse_bad_input():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"real must hold at least 4 row\(s\)"):
        precision_recall(torch.empty(0, 3), x)
    with pytest.raises(ValueError, match=r"fake must hold at least 4 row\(s\)"):
        precision_recall(x, x[:3], k=3)
    with pytest.raises(ValueError, match="fake has dimension 2 but samples have 3"):
        precision_recall(x, torch.randn(10, 2))
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match=r"fake must hold at least 2 row\(s\)"):
        frechet_distance(x, torch.empty(0, 3))
    with pytest.raises(ValueError, match="real row 2 holds NaN or inf"):
        frechet_distance(torch.cat([x[:2], torch.full((1, 3), math.inf), x]), x)
    with pytest.raises(ValueError, match=r"samples must hold at least 1 row\(s\)"):
        filter_samples(torch.empty(0, 3), x[0])
    with pytest.raises(ValueError, match="condition has dimension 2 but samples have 3"):
        filter_samples(x, torch.ones(2))
    with pytest.raises(ValueError, match=r"condition must be \(d,\) or have one row per sample \(10\), got 3 rows"):
        filter_samples(x, x[:3])
    with pytest.raises(ValueError, match="samples row 1 is all zeros"):
        filter_samples(torch.stack([x[0], torch.zeros(3)]), x[0])
    with pytest.raises(ValueError, match=r"min_similarity must be None or a number in \[-1.0, 1.0\], got 2"):
        filter_samples(x, x[0], min_similarity=2)
    with pytest.raises(TypeError, match="samples must be a torch.Tensor or a numpy array, got list"):
        filter_samples([[1.0]], [1.0])
