"""Data parallelism: two CPU processes (gloo) with batch b give the loss curve and parameters of one process with
batch 2b, within float tolerance; only rank 0 writes logs and checkpoints."""
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hybridrag.train import HybridRAGTrainer, RAGDataset, TinyCausalLM, TrainingConfig

VOCAB, STEPS = 32, 4


def _dataset():
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(16):
        query = torch.randint(3, VOCAB - 1, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        items.append({"query_ids": query, "context_ids": [1], "answer_ids": [t + 1 for t in query][:3],
                      "retrieved_docs": [], "task_type": "qa"})
    return RAGDataset(items)


def _run(batch_size, output_dir):
    torch.manual_seed(0)
    model = TinyCausalLM(VOCAB, dim=32, layers=1, heads=2, max_len=16)
    config = TrainingConfig(max_steps=STEPS, epochs=None, batch_size=batch_size, learning_rate=3e-3, log_every=1,
                            output_dir=str(output_dir), progress_bar=False)
    trainer = HybridRAGTrainer(config, model, _dataset())
    trainer.train()
    return [h["loss"] for h in trainer.history if "loss" in h], model


def _worker(rank, port, output_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        losses, model = _run(2, output_dir / "ddp")
        torch.save({"losses": losses, "state": model.state_dict()}, output_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.usefixtures("one_thread")
def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    single_losses, single = _run(4, tmp_path / "single")
    # fork: the children inherit the imported modules (spawn would import torch and hybridrag again, ~10 s)
    mp.start_processes(_worker, args=(_free_port(), tmp_path), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every rank logs the all-reduced loss
    assert ranks[0]["losses"] == pytest.approx(single_losses, rel=1e-5)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-4, atol=1e-5)
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name])
    lines = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))  # one writer: rank 0
    assert sorted(p.name for p in (tmp_path / "ddp").glob("checkpoint-*.pt")) == ["checkpoint-00000004.pt"]
