"""Seed 004's weight contract: `WeightUpdater(graph, {"strategy": "ema", "update_alpha": 0.1})` and
`await update_weights(hyperedge_id, signal)` -> the hyperedge's new weight, stored in the graph.

graph is the seed's graph storage: any object with async `get_node(id) -> dict | None` and async
`upsert_node(id, dict)` (the node methods of HyperGraphRAG's BaseGraphStorage, where hyperedges are nodes); a
hyperedge's node dict holds its "weight". `HyperedgeGraph` is an in-memory one. With alpha = update_alpha in (0, 1]
and signal in [0, 1] (the seed's feedback: 1 for a used item, negative_feedback 0.3 for an ignored one):

    ema:  weight <- (1 - alpha) * weight + alpha * signal        (a repeated signal s draws the weight to s)

The node's other fields are kept. One updater runs its updates one at a time (an asyncio lock around get_node ..
upsert_node), so concurrent updates of one hyperedge are never lost.
"""
import asyncio
import inspect
from collections.abc import Mapping

from .feedback_mapping import check_number, merge_config

__all__ = ["HyperedgeGraph", "SeedWeights", "STRATEGIES", "CONFIG_DEFAULTS"]

STRATEGIES = ("ema",)
CONFIG_DEFAULTS = {"strategy": "ema", "update_alpha": 0.1}


def _check_id(hyperedge_id):
    if not isinstance(hyperedge_id, str):
        raise TypeError(f"hyperedge ids must be str, got {type(hyperedge_id).__name__}")
    if not hyperedge_id:
        raise ValueError("hyperedge ids must be non-empty str, got ''")
    return hyperedge_id


class HyperedgeGraph:
    """In-memory graph storage: hyperedge id -> node dict with a "weight".

    weights: {id: initial weight}. get_node returns a copy (None for an unknown id) and upsert_node stores one, as a
    database would: a caller's dict never aliases the stored node.
    """

    def __init__(self, weights=None):
        if weights is not None and not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a dict {{hyperedge id: weight}} or None, got {type(weights).__name__}")
        self._nodes = {_check_id(key): {"weight": check_number(f"weights[{key!r}]", value)}
                       for key, value in (weights or {}).items()}

    def __len__(self):
        return len(self._nodes)

    def __contains__(self, hyperedge_id):
        return hyperedge_id in self._nodes

    def __repr__(self):
        return f"HyperedgeGraph({ {key: node['weight'] for key, node in self._nodes.items()} })"

    def weight(self, hyperedge_id):
        """The stored weight of one hyperedge (float)."""
        if hyperedge_id not in self._nodes:
            raise ValueError(f"hyperedge {hyperedge_id!r} is not in the graph")
        return self._nodes[hyperedge_id]["weight"]

    async def get_node(self, node_id):
        node = self._nodes.get(node_id)
        return None if node is None else dict(node)

    async def upsert_node(self, node_id, node_data):
        _check_id(node_id)
        if not isinstance(node_data, Mapping):
            raise TypeError(f"node_data must be a dict, got {type(node_data).__name__}")
        if "weight" not in node_data:
            raise ValueError(f"node_data of {node_id!r} has no 'weight'")
        self._nodes[node_id] = {**node_data, "weight": check_number("node_data['weight']", node_data["weight"])}


class SeedWeights:
    """The seed form's state and `update`; WeightUpdater(graph, config) holds one.

    config: a dict with "strategy" ("ema", the one the seed defines) and "update_alpha" in (0, 1]; missing keys take
    CONFIG_DEFAULTS, unknown keys are refused.
    """

    def __init__(self, graph, config=None):
        missing = [name for name in ("get_node", "upsert_node")
                   if not inspect.iscoroutinefunction(getattr(graph, name, None))]
        if missing:
            raise TypeError(f"graph must provide async get_node(id) and upsert_node(id, node) (the seed's graph "
                            f"storage, e.g. HyperedgeGraph), but {type(graph).__name__} has no async "
                            f"{' or '.join(missing)}")
        values = merge_config(config, CONFIG_DEFAULTS)
        if values["strategy"] not in STRATEGIES:
            raise ValueError(f"config['strategy'] must be one of {STRATEGIES} (the seed defines ema only), got "
                             f"{values['strategy']!r}")
        values["update_alpha"] = check_number("config['update_alpha']", values["update_alpha"])
        if not 0 < values["update_alpha"] <= 1:
            raise ValueError(f"config['update_alpha'] must be in (0, 1], got {values['update_alpha']}")
        self.graph, self.config = graph, values
        self._lock = asyncio.Lock()

    def __repr__(self):
        return f"WeightUpdater({type(self.graph).__name__}, {self.config})"

    async def update(self, hyperedge_id, signal):
        """EMA of the hyperedge's weight towards signal in [0, 1]; returns the new weight (float)."""
        _check_id(hyperedge_id)
        signal = check_number("signal", signal)
        if not 0 <= signal <= 1:
            raise ValueError(f"signal must be a feedback in [0, 1], got {signal}")
        alpha = self.config["update_alpha"]
        async with self._lock:
            node = await self.graph.get_node(hyperedge_id)
            if node is None:
                raise ValueError(f"hyperedge {hyperedge_id!r} is not in the graph")
            if not isinstance(node, Mapping) or "weight" not in node:
                raise ValueError(f"the graph's node {hyperedge_id!r} has no 'weight', got {node!r}")
            weight = check_number(f"the weight of hyperedge {hyperedge_id!r}", node["weight"])
            weight = (1 - alpha) * weight + alpha * signal
            await self.graph.upsert_node(hyperedge_id, {**node, "weight": weight})
        return weight
