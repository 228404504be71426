"""Fixtures the kernel test files share."""
from __future__ import annotations

import pytest


@pytest.fixture
def plan_metas(monkeypatch) -> list:
    """The constexprs of every launch plan computed while the test runs, latest last."""
    from kernels import attention as A

    metas = []
    real_plan = A._launch_plan

    def spying(key):
        plan = real_plan(key)
        metas.append(plan.meta)
        return plan

    monkeypatch.setattr(A, "_launch_plan", spying)
    return metas
