"""One torch thread for the search tests (the CI machine is small and shared); restored afterwards.
``setup``: TinyNet and its small-space database, built once per test module."""

import pytest
import torch
from search_fixtures import TinyNet, calib, small_space

from brainsurgeon.search import build_database


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = TinyNet()
    table = build_database(model, small_space(), calib(), tmp_path_factory.mktemp("db"))
    return model, table
