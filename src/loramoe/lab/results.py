"""From the runs' ``eval.json`` files to the lab's numbers: one row per scored model, the base
model's row, and the comparisons the report states in words. Everything the report shows is in
``results.json``, and the report reads nothing else.

Scores are percentages. Knowledge: the share of held-out fact questions whose answer (any alias)
the model's reply contains, pooled over the relations. Task score: the mean over task benchmarks
of each one's main metric (``MAIN``).
"""

from __future__ import annotations

from typing import Any

MAIN = {"qa": "contains", "rouge": "rougeL", "translation": "chrf", "accuracy": "accuracy"}


def _pooled_knowledge(benchmarks: dict[str, Any], key: str = "items") -> tuple[float, int, dict[str, float]]:
    correct = total = 0
    per_relation = {}
    for name, entry in benchmarks.items():
        if entry["type"] != "knowledge":
            continue
        items = entry[key]
        hits = sum(1 for item in items if item["contains"] > 0)
        correct, total = correct + hits, total + len(items)
        per_relation[name.split("/", 1)[1]] = 100.0 * hits / max(len(items), 1)
    return 100.0 * correct / max(total, 1), total, per_relation


def _tasks(benchmarks: dict[str, Any]) -> dict[str, float]:
    return {name.split("/", 1)[1]: entry["scores"][MAIN[entry["metric"]]]
            for name, entry in benchmarks.items() if entry["type"] == "task"}


def _text(benchmarks: dict[str, Any]) -> dict[str, Any]:
    return next(entry for entry in benchmarks.values() if entry["metric"] == "lm_loss")


def base_row(evaluation: dict[str, Any]) -> dict[str, Any]:
    benchmarks = evaluation["benchmarks"]
    knowledge, questions, per_relation = _pooled_knowledge(benchmarks)
    tasks = _tasks(benchmarks)
    return {"knowledge": knowledge, "knowledge_questions": questions, "knowledge_per_relation": per_relation,
            "task_score": sum(tasks.values()) / len(tasks), "tasks": tasks,
            "lm_loss": _text(benchmarks)["scores"]["cross_entropy"]}


def run_row(record: dict[str, Any], evaluation: dict[str, Any], base: dict[str, Any],
            router: dict[str, Any] | None = None) -> dict[str, Any]:
    """A scored run's row, from its ``lab_run.json`` record, its ``eval.json`` and, for LoRAMoE,
    its ``router.json`` (gate share per expert)."""
    benchmarks = evaluation["benchmarks"]
    knowledge, questions, per_relation = _pooled_knowledge(benchmarks)
    lost = sum(len(e["change"]["lost"]) for e in benchmarks.values() if e["type"] == "knowledge")
    gained = sum(len(e["change"]["gained"]) for e in benchmarks.values() if e["type"] == "knowledge")
    tasks = _tasks(benchmarks)
    text = _text(benchmarks)
    shift = text.get("forgetting", {})
    train = record["train"]
    row = {
        "name": record["name"], "variant": record["variant"], "method": record["method"], "size": record["size"],
        "factor": float(record["size"].rstrip("x")), "records": record["records"], "sequential": record["sequential"],
        "knowledge": knowledge, "knowledge_change": knowledge - base["knowledge"], "knowledge_questions": questions,
        "knowledge_lost": lost, "knowledge_gained": gained, "knowledge_per_relation": per_relation,
        "task_score": sum(tasks.values()) / len(tasks), "tasks": tasks,
        "lm_loss": text["scores"]["cross_entropy"], "kl_to_base": shift.get("kl"),
        "drift": evaluation.get("drift", {}).get("mean"),
        "trainable_parameters": train["trainable_parameters"], "train_steps": train["steps"],
        "train_loss": train["train_loss"], "train_seconds": record["train_seconds"], "run_seconds": record["seconds"],
        "folder": record["folder"],
    }
    row["task_change"] = row["task_score"] - base["task_score"]
    if "router" in evaluation:
        row["router"] = _mean_by_type(evaluation["router"], evaluation)
    if router is not None:
        row["router_experts"] = _mean_by_type({name: shares["mean"] for name, shares in router["sets"].items()},
                                              evaluation)
        row["groups"] = router["groups"]
    return row


def _mean_by_type(per_benchmark: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """Per sample type, the mean over its benchmarks of each benchmark's gate shares: a mapping
    (per expert group) averaged key by key, or a list (per expert) element by element."""
    by_type: dict[str, list[Any]] = {}
    for name, shares in per_benchmark.items():
        by_type.setdefault(evaluation["benchmarks"][name]["type"], []).append(shares)

    def mean(rows: list[Any]) -> Any:
        if isinstance(rows[0], dict):
            return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
        return [sum(column) / len(column) for column in zip(*rows)]

    return {kind: mean(rows) for kind, rows in by_type.items()}


def findings(rows: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    """The comparisons the report's paragraph states, at the largest data size (non-sequential)."""
    largest = max(row["factor"] for row in rows)
    at_largest = [row for row in rows if row["factor"] == largest and not row["sequential"]]
    kept = max(at_largest, key=lambda r: r["knowledge"])
    worst = min(at_largest, key=lambda r: r["knowledge"])
    skill = max(at_largest, key=lambda r: r["task_score"])
    by_variant = {row["variant"]: row for row in at_largest}
    out: dict[str, Any] = {
        "largest_size": at_largest[0]["size"], "base_knowledge": base["knowledge"], "base_task_score": base["task_score"],
        "most_knowledge": {"variant": kept["variant"], "knowledge": kept["knowledge"],
                           "change": kept["knowledge_change"]},
        "least_knowledge": {"variant": worst["variant"], "knowledge": worst["knowledge"],
                            "change": worst["knowledge_change"]},
        "best_tasks": {"variant": skill["variant"], "task_score": skill["task_score"],
                       "change": skill["task_change"]},
        "full_loses_knowledge": by_variant["full"]["knowledge_change"] < 0 if "full" in by_variant else None,
    }
    if "full" in by_variant:
        out["full"] = {"knowledge_change": by_variant["full"]["knowledge_change"],
                       "task_change": by_variant["full"]["task_change"], "kl_to_base": by_variant["full"]["kl_to_base"]}
    lbc = next((r for r in at_largest if r["method"] == "loramoe" and r["variant"].endswith("lbc")), None)
    if lbc is not None and "full" in by_variant:
        out["loramoe_lbc_vs_full"] = {"variant": lbc["variant"],
                                      "knowledge_gap": lbc["knowledge"] - by_variant["full"]["knowledge"],
                                      "task_gap": lbc["task_score"] - by_variant["full"]["task_score"]}
    return out
