import os
from pathlib import Path

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


@pytest.fixture(scope="module")
def mlflow_store(mlflow_root):
    """``mlflow_root`` with the default experiment created: one sqlite store per module (creating the database
    costs seconds), so each test uses its own model name."""
    from tasks.on_mlflow import tracking
    from tasks.settings import MlflowConfig

    tracking.ensure_experiment(MlflowConfig(), mlflow_root / "home")
    return mlflow_root


@pytest.fixture(scope="session")
def sharp_tiny_dir(tmp_path_factory):
    """A tiny judge whose probabilities spread (tests/serve_fixtures.py), saved once per session."""
    from serve_fixtures import save_sharp_tiny_judge

    return str(save_sharp_tiny_judge(tmp_path_factory.mktemp("sharp-tiny")))


@pytest.fixture(scope="session")
def open_server(sharp_tiny_dir):
    """One `gram serve` of the sharp tiny judge for the session's client tests (tests/serve_fixtures.py): no
    token (OpenRLHF sends none), --max-rows 1024 (a request over the 512-sequence batch bound is scored in parts).
    Yields its URL. At the end, SIGTERM while a batch is stuck mid-scoring: the drain gives up after 5 s, the
    request is dropped, not answered, and the process exits 0 within 10 s."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from serve_fixtures import GramServe, call

    server = GramServe("--max-rows", "1024", model=sharp_tiny_dir, prefix="go")
    try:
        server.wait_ready()
        yield server.url
        server.hold.touch()
        body = {"query": ["Say hi. Hi!"], "prompts": ["Say hi. "], "labels": ["Hello."]}
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(call, server.url, "/get_reward", body, None, None, 60)
            server.wait_until(lambda: call(server.url, "/v1/stats")[1]["pending_rows"] > 0, "holding a batch", 30)
            signalled = time.monotonic()
            code = server.stop(timeout_s=60)
            stopped = time.monotonic() - signalled
            try:
                status = stuck.result()[0]
            except OSError:  # the connection closed under it
                status = None
        assert stopped < 10 and code == 0, f"exit {code} {stopped:.1f} s after SIGTERM (1: the last-resort timer)"
        assert status != 200  # dropped when the drain gave up, not answered
    finally:
        server.close()


@pytest.fixture(scope="session")
def open_server_judge(sharp_tiny_dir):
    """The judge ``open_server`` serves, in this process: what every reward through it must equal."""
    from serve_fixtures import load_served_judge

    return load_served_judge(sharp_tiny_dir)
