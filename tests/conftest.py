import os

# Tests never touch a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_servers():
    """Stop Prefect's temporary API servers inside the session: left to its atexit hook, the server logs its
    shutdown after pytest has closed the output ("--- Logging error ---" after the summary)."""
    yield
    import sys

    server = sys.modules.get("prefect.server.api.server")  # only if a test started one
    if server is not None:
        for instance in list(server.SubprocessASGIServer._instances.values()):
            instance.stop()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from gram_core.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from gram_core.models import build_tiny_model

    return build_tiny_model(tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data when it exists (real data for optional tests), else skip."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not available")
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Tiny models run ~45x slower with 2 threads on a busy 2-core machine; real-model tests ask for more with
    @pytest.mark.threads(n)."""
    import torch

    marker = request.node.get_closest_marker("threads")
    before = torch.get_num_threads()
    torch.set_num_threads(marker.args[0] if marker else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory):
    """A temporary folder for one module's MLflow sqlite store, with the working directory moved to an
    empty sub-folder that must stay empty (MLflow must never create ./mlruns) and MLFLOW_TRACKING_URI unset."""
    root = tmp_path_factory.mktemp("mlflow")
    cwd = root / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(cwd)
        yield root
        assert list(cwd.iterdir()) == [], "nothing may be written to the working directory (./mlruns)"
