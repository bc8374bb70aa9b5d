"""`afedge bench`: latency, throughput and memory of every runtime of a bundle, against a KV-cache transformer
baseline, PyTorch eager and (for imported HF models) transformers' own `generate`, with a memory-bandwidth roofline
and per-target budgets. Each runtime is measured in a fresh subprocess (`afedge.bench.worker`) so its RSS is its
own. Heavy dependencies (matplotlib, the runtimes) are imported inside the functions that need them."""
from afedge.bench.budgets import BUDGET_KEYS, BudgetError, budget_errors

__all__ = ["BUDGET_KEYS", "BudgetError", "budget_errors"]
