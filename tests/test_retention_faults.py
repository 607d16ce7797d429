"""MemoryManager and ContinualLearner under faults: huge, tiny and non-finite vectors, non-finite training inputs,
losses and gradients, damaged or mismatched checkpoints (all-or-nothing loads), and temporaries of killed writers."""
import hashlib
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hybridrag.retention.continual import ContinualLearner
from hybridrag.retention.memory import MemoryManager, remove_stale_temporaries, write_atomically
from hybridrag.retrieval.neural import NeuralRetriever

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 4


# ------------------------------------------------------------------------------------------------------- helpers
def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def killed_mid_write(path):
    """Fork a child that starts write_atomically(path) and dies half-way, as a killed writer would; returns the name
    of the temporary it left."""
    before = set(os.listdir(os.path.dirname(path)))
    pid = os.fork()
    if pid == 0:  # the child: write part of the file, then die without any clean-up
        write_atomically(path, lambda file: (file.write(b"partial"), file.flush(), os._exit(0)))
        os._exit(1)
    os.waitpid(pid, 0)
    (left,) = set(os.listdir(os.path.dirname(path))) - before
    assert re.fullmatch(rf"\.{re.escape(os.path.basename(path))}\.{pid}\.[a-z0-9_]{{8}}\.tmp", left)
    return left


def learner(optimizer=None, output_dim=None, **kwargs):
    torch.manual_seed(0)
    retriever = NeuralRetriever(DIM, output_dim)
    if optimizer == "sgd":
        optimizer = torch.optim.SGD(retriever.parameters(), lr=0.1, momentum=0.9)
    made = ContinualLearner(retriever, optimizer=optimizer, batch_size=2, **kwargs)
    g = torch.Generator().manual_seed(1)
    made.observe(torch.randn(6, DIM, generator=g), torch.randn(6, DIM, generator=g))
    return made


def snapshot(learner_):
    """Bitwise copies of the parameters, buffers and optimizer state tensors."""
    model = {k: v.detach().clone() for k, v in learner_.retriever.state_dict().items()}
    state = learner_.optimizer.state_dict()["state"]
    optimizer = {(i, k): v.clone() for i, entries in state.items() for k, v in entries.items()
                 if isinstance(v, torch.Tensor)}
    return model, optimizer


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# -------------------------------------------------------------------------------------- MemoryManager vectors
@pytest.mark.parametrize("value", [1e20, 1e-30, 1e300, 1e-300], ids=["1e20", "1e-30", "1e300", "1e-300"])
def test_huge_and_tiny_finite_vectors_keep_their_direction(value):
    memory = MemoryManager(4, DIM)
    direction = np.array([1.0, -2.0, 2.0, 0.0])  # norm 3
    memory.add("a", direction * value)
    np.testing.assert_allclose(memory.get("a").embedding, direction / 3, rtol=1e-6)
    (hit,) = memory.search(direction * value, 1)
    assert hit.key == "a" and hit.score == pytest.approx(1.0, rel=1e-6)


def test_huge_float32_and_tensor_inputs():
    memory = MemoryManager(4, DIM)
    memory.add("f32", np.full(DIM, 1e20, dtype=np.float32))          # its float32 square overflows
    memory.add("t64", torch.full((DIM,), 1e300, dtype=torch.float64))  # beyond float32 until normalised
    for key in ("f32", "t64"):
        np.testing.assert_allclose(memory.get(key).embedding, np.full(DIM, 0.5), rtol=1e-6)
    hits = memory.search(np.full((2, DIM), 1e20), 2)
    assert [[h.score for h in row] for row in hits] == [[pytest.approx(1.0)] * 2] * 2


@pytest.mark.parametrize("normalize", [True, False])
def test_non_finite_vectors_and_queries_are_refused(normalize):
    memory = MemoryManager(4, DIM, normalize=normalize)
    memory.add("a", np.ones(DIM))
    with pytest.raises(ValueError, match=r"embedding has NaN or inf values \(the first at index 2\)"):
        memory.add("b", np.array([1.0, 0.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match=r"embedding has NaN or inf values \(the first at index 0\)"):
        memory.add("b", torch.tensor([np.inf, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"query has NaN or inf values \(the first at index \(1, 3\)\)"):
        memory.search(np.array([[1.0, 0, 0, 0], [0, 0, 0, -np.inf]]), 1)
    assert memory.keys() == ["a"] and memory.tick == 1


def test_zero_vectors_refused_when_normalising_stored_as_zero_otherwise():
    memory = MemoryManager(4, DIM)
    with pytest.raises(ValueError, match=r"embedding has a zero vector, which cannot be normalised"):
        memory.add("z", np.zeros(DIM))
    with pytest.raises(ValueError, match=r"query has a zero vector \(row 1\), which cannot be normalised"):
        memory.search(np.array([[1.0, 0, 0, 0], [0, 0, 0, 0]]), 1)
    raw = MemoryManager(4, DIM, normalize=False)
    raw.add("z", np.zeros(DIM))
    assert raw.search(np.ones(DIM), 1)[0].score == 0.0
    with pytest.raises(ValueError, match=r"embedding has values beyond the float32 range \(largest magnitude 1e\+39"):
        raw.add("h", np.full(DIM, 1e39))


def test_memory_load_refuses_non_finite_embeddings(tmp_path):
    memory = MemoryManager(2, DIM)
    memory.add("a", np.ones(DIM))
    memory.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as data:
        arrays = dict(data)
    arrays["embeddings"][0, 1] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(ValueError, match=r"nan.npz' is not a readable .*embeddings has NaN or inf values"):
        MemoryManager.load(tmp_path / "nan.npz")


def test_memory_bit_flips_load_identically_or_raise_value_error(tmp_path):
    """Every member carries a CRC-32; flips outside the data (zip timestamps, say) may load, but only unchanged."""
    memory = MemoryManager(4, DIM)
    for i in range(3):
        memory.add(str(i), np.random.default_rng(i).standard_normal(DIM), {"n": i})
    path = tmp_path / "m.npz"
    memory.save(path)
    data = path.read_bytes()
    rng = random.Random(0)
    flipped = tmp_path / "flipped.npz"
    for _ in range(400):
        damaged = bytearray(data)
        damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        flipped.write_bytes(bytes(damaged))
        try:
            loaded = MemoryManager.load(flipped)
        except ValueError as err:
            assert "flipped.npz' is not a readable hybridrag.MemoryManager file" in str(err)
            continue
        assert loaded.keys() == memory.keys() and loaded.tick == memory.tick
        assert np.array_equal(loaded._embeddings, memory._embeddings)
        assert [loaded.get(k).payload for k in loaded.keys()] == [{"n": i} for i in range(3)]


# ------------------------------------------------------------------------------------------------ temporaries
@pytest.mark.skipif(os.name != "posix", reason="the pid probe needs POSIX signals")
def test_memory_save_and_load_remove_the_temporaries_of_killed_writers(tmp_path):
    path = tmp_path / "m.npz"
    memory = MemoryManager(2, DIM)
    memory.add("a", np.ones(DIM))
    left = killed_mid_write(str(path))
    memory.save(path)
    assert sorted(os.listdir(tmp_path)) == ["m.npz"], f"{left} was left"
    left = killed_mid_write(str(path))
    assert MemoryManager.load(path).keys() == ["a"]
    assert sorted(os.listdir(tmp_path)) == ["m.npz"], f"{left} was left"


@pytest.mark.skipif(os.name != "posix", reason="the pid probe needs POSIX signals")
def test_only_stale_temporaries_of_that_path_are_removed(tmp_path):
    dead, live = dead_pid(), os.getppid()
    names = {
        f".m.npz.{dead}.abcd1234.tmp": "removed (its writer is gone)",
        ".m.npz.old_1234.tmp": "removed (no pid, older than an hour)",
        f".m.npz.{live}.abcd1234.tmp": "kept (a live writer)",
        f".m.npz.{os.getpid()}.abcd1234.tmp": "kept (this process may be writing it)",
        ".m.npz.new_1234.tmp": "kept (no pid, recent)",
        f".other.npz.{dead}.abcd1234.tmp": "kept (another path)",
        f".m.npz.x.{dead}.abcd1234.tmp": "kept (the temporary of m.npz.x)",
        f".m.npz.{dead}.abc.tmp": "kept (not a temporary name)",
    }
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    hour_ago = time.time() - 3601
    os.utime(tmp_path / ".m.npz.old_1234.tmp", (hour_ago, hour_ago))
    removed = remove_stale_temporaries(tmp_path, re.escape("m.npz"))
    assert sorted(removed) == sorted(name for name, fate in names.items() if fate.startswith("removed"))
    assert sorted(os.listdir(tmp_path)) == sorted(name for name, fate in names.items() if fate.startswith("kept"))


@pytest.mark.skipif(os.name != "posix", reason="the pid probe needs POSIX signals")
def test_checkpoint_saves_remove_the_temporaries_of_killed_writers(tmp_path):
    made = learner(checkpoint_dir=tmp_path, checkpoint_every=1)
    killed_mid_write(str(tmp_path / "step-00000001.pt"))  # an auto checkpoint whose name is never written again
    killed_mid_write(str(tmp_path / "mine.pt"))
    made.step()  # writes step-00000001.pt: the temporaries of every automatic checkpoint name go
    assert [name for name in os.listdir(tmp_path) if name.startswith(".step-")] == []
    assert len([name for name in os.listdir(tmp_path) if name.startswith(".mine.pt.")]) == 1, "another path's"
    made.save_checkpoint(tmp_path / "mine.pt")
    assert sorted(os.listdir(tmp_path)) == ["mine.pt", "step-00000001.pt"]
    killed_mid_write(str(tmp_path / "mine.pt"))
    made.load_checkpoint(tmp_path / "mine.pt")
    assert sorted(os.listdir(tmp_path)) == ["mine.pt", "step-00000001.pt"]


# --------------------------------------------------------------------------------- ContinualLearner: NaN/inf
def test_observe_refuses_non_finite_rows():
    made = learner()
    buffered = list(made.buffer)
    bad = torch.randn(3, DIM)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"queries row 1 has NaN or inf values"):
        made.observe(bad, torch.randn(3, DIM))
    bad = torch.randn(3, DIM)
    bad[2, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"positives row 2 has NaN or inf values"):
        made.observe(torch.randn(3, DIM), bad)
    negatives = torch.randn(3, 2, DIM)
    negatives[0, 1, 3] = float("inf")
    fresh = learner()
    with pytest.raises(ValueError, match=r"hard_negatives row 0 has NaN or inf values"):
        ContinualLearner(fresh.retriever, batch_size=2).observe(torch.randn(3, DIM), torch.randn(3, DIM), negatives)
    assert len(made.buffer) == len(buffered) and all(
        torch.equal(a, b) for old, new in zip(buffered, made.buffer) for a, b in zip(old[:2], new[:2]))


def test_a_non_finite_loss_refuses_the_step_and_changes_nothing():
    made = learner()
    made.step()  # AdamW now has state to keep
    with torch.no_grad():  # a diverged weight: every query vector is NaN after normalisation
        made.retriever.query_tower.weight[0, 0] = float("inf")
    model, optimizer = snapshot(made)
    with pytest.raises(FloatingPointError, match=r"step 2 refused: the loss of micro-batch 0 is (nan|inf|-inf); the "
                                                 r"optimizer step was not taken"):
        made.step()
    after_model, after_optimizer = snapshot(made)
    assert_bitwise_equal(model, after_model)
    assert_bitwise_equal(optimizer, after_optimizer)
    assert made.step_count == 1 and all(p.grad is None for p in made.retriever.parameters())


@pytest.mark.parametrize("optimizer", [None, "sgd"], ids=["adamw", "sgd"])
def test_a_non_finite_gradient_refuses_the_step_and_changes_nothing(optimizer):
    made = learner(optimizer, accumulation_steps=2)
    made.step()
    name, parameter = next(iter(made.retriever.named_parameters()))
    hook = parameter.register_hook(lambda grad: grad * float("nan"))
    model, state = snapshot(made)
    with pytest.raises(FloatingPointError, match=rf"step 2 refused: the gradient of {re.escape(name)} has NaN or inf"):
        made.step()
    after_model, after_state = snapshot(made)
    assert_bitwise_equal(model, after_model)
    assert_bitwise_equal(state, after_state)
    hook.remove()
    assert made.step()["step"] == 2, "the learner goes on once the gradients are finite again"


# ---------------------------------------------------------------------------------- ContinualLearner: files
def test_checkpoint_layout_is_a_checksummed_header_then_the_payload(tmp_path):
    path = learner().save_checkpoint(tmp_path / "c.pt")
    data = path.read_bytes()
    header, payload = data.split(b"\n", 1)
    assert header == b"hybridrag.ContinualLearner checkpoint 3 sha256=" + hashlib.sha256(payload).hexdigest().encode()


def test_any_flipped_bit_is_refused(tmp_path):
    made = learner()
    made.step()
    data = made.save_checkpoint(tmp_path / "c.pt").read_bytes()
    rng = random.Random(0)
    flipped = tmp_path / "flipped.pt"
    positions = [0, 40, 60, 111, len(data) - 1] + [rng.randrange(len(data)) for _ in range(200)]
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 1 << rng.randrange(8)
        flipped.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match=r"flipped.pt (is corrupt|is not a ContinualLearner checkpoint)"):
            learner().load_checkpoint(flipped)


def test_empty_truncated_garbage_legacy_and_missing_files(tmp_path):
    good = learner().save_checkpoint(tmp_path / "good.pt").read_bytes()
    cases = {"empty.pt": (b"", r"empty.pt is empty"),
             "truncated.pt": (good[:len(good) // 2], r"truncated.pt is corrupt: its \d+ payload bytes have sha256"),
             "header_only.pt": (good[:60], r"header_only.pt is not a ContinualLearner checkpoint of format 3"),
             "garbage.pt": (b"\x00\xff" * 500, r"garbage.pt is not a ContinualLearner checkpoint of format 3: .*"
                                               r"\(garbage\)"),
             "future.pt": (good.replace(b"checkpoint 3 ", b"checkpoint 4 ", 1), r"future.pt is a ContinualLearner "
                                                                                r"checkpoint of format 4")}
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=match):
            learner().load_checkpoint(tmp_path / name)
    torch.save({"format": 1}, tmp_path / "legacy.pt")
    with pytest.raises(ValueError, match=r"legacy.pt is not a .*\(a torch.save file without the header"):
        learner().load_checkpoint(tmp_path / "legacy.pt")
    with pytest.raises(FileNotFoundError, match=r"no ContinualLearner checkpoint at .*absent.pt"):
        learner().load_checkpoint(tmp_path / "absent.pt")


def test_a_checksummed_payload_that_is_no_checkpoint(tmp_path):
    payload_path = tmp_path / "payload"
    torch.save({"format": 3, "model": {}}, payload_path)
    payload = payload_path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest().encode()
    (tmp_path / "odd.pt").write_bytes(b"hybridrag.ContinualLearner checkpoint 3 sha256=" + digest + b"\n" + payload)
    with pytest.raises(ValueError, match=r"odd.pt is not a .* its payload lacks \['buffer', 'config', 'cursor'"):
        learner().load_checkpoint(tmp_path / "odd.pt")


@pytest.mark.parametrize("saver, loader, match", [
    (dict(), dict(optimizer="sgd"), r"holds the state of a torch.optim.adamw.AdamW optimizer but this learner's "
                                    r"optimizer is a torch.optim.sgd.SGD"),
    (dict(optimizer="sgd"), dict(), r"holds the state of a torch.optim.sgd.SGD optimizer but this learner's "
                                    r"optimizer is a torch.optim.adamw.AdamW"),
    (dict(), dict(output_dim=8), r"the checkpoint's model does not match this learner's retriever: "
                                 r"document_tower.weight is \(4, 4\) in the checkpoint but \(8, 4\) here; query_tower"),
])
def test_a_mismatched_checkpoint_is_refused_before_anything_changes(tmp_path, saver, loader, match):
    source = learner(**saver)
    source.step()
    path = source.save_checkpoint(tmp_path / "c.pt")
    target = learner(**loader)
    target.step()
    target.step()
    model, optimizer = snapshot(target)
    buffer, generator = list(target.buffer), target._generator.get_state()
    with pytest.raises(ValueError, match=match):
        target.load_checkpoint(path)
    after_model, after_optimizer = snapshot(target)
    assert_bitwise_equal(model, after_model)
    assert_bitwise_equal(optimizer, after_optimizer)
    assert target.step_count == 2 and target.buffer == type(target.buffer)(buffer, maxlen=target.buffer_size)
    assert torch.equal(target._generator.get_state(), generator)


def test_a_load_that_fails_at_the_optimizer_leaves_the_model_weights(tmp_path, monkeypatch):
    source = learner()
    for _ in range(3):
        source.step()
    path = source.save_checkpoint(tmp_path / "c.pt")
    target = learner()
    target.step()
    model, optimizer = snapshot(target)
    original = target.optimizer.load_state_dict
    calls = []

    def failing_once(state):
        calls.append(state)
        if len(calls) == 1:
            raise ValueError("simulated optimizer failure")
        return original(state)

    monkeypatch.setattr(target.optimizer, "load_state_dict", failing_once)
    with pytest.raises(ValueError, match="simulated optimizer failure"):
        target.load_checkpoint(path)
    after_model, after_optimizer = snapshot(target)
    assert_bitwise_equal(model, after_model)
    assert_bitwise_equal(optimizer, after_optimizer)
    assert target.step_count == 1
    target.load_checkpoint(path)  # the same file loads once the optimizer accepts it
    assert target.step_count == 3
