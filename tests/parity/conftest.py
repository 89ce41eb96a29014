import pytest


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """Where expanded fixture CLIP checkpoints are written (once per session)."""
    return tmp_path_factory.mktemp("fixture_clip")
