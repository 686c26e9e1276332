import os

from esm2_service.worker.openmp import SPIN_COUNT, configure_openmp_wait


def test_openmp_threads_spin_briefly_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    configure_openmp_wait()
    assert os.environ["GOMP_SPINCOUNT"] == SPIN_COUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    configure_openmp_wait()
    assert os.environ["GOMP_SPINCOUNT"] == "5"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    configure_openmp_wait()
    assert "GOMP_SPINCOUNT" not in os.environ
