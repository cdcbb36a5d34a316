"""The pure decision core: lifecycle states and rules, the router's snapshot, and the policy.

Nothing here imports Ray, torch, CTranslate2, transformers, faster-whisper or pynvml
(`tests/unit/core/test_purity.py` checks it), and every clock is injected, so each decision is
a plain function of plain data, unit tested without a cluster.
"""
