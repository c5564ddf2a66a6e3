"""Bad input gives one clear IndexInputError; a missing or CPU-only faiss names the extra."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import faiss_index
from faiss_index import ExactIndex, FaissUnavailableError, IndexInputError, KINDS, make_index


@pytest.fixture(params=["exact", "ivfpq"])
def index(request):
    if request.param != "exact":
        pytest.importorskip("faiss")
    ix = make_index(request.param, 4, 3)
    ix.upsert([1, 2, 3], torch.eye(4)[:3], [0, 1, 2])
    return ix


@pytest.mark.parametrize("call, match", [
    (lambda ix: ix.upsert([4], torch.ones(1, 5), [0]), "dimension 5 but the index has dimension 4"),
    (lambda ix: ix.upsert([4], torch.tensor([[float("inf"), 0, 0, 0]]), [0]), "NaN or infinite"),
    (lambda ix: ix.upsert([4], torch.ones(1, 4), [3]), r"contains 3, outside 0\.\.2"),
    (lambda ix: ix.upsert([4], torch.ones(1, 4), [-1]), r"contains -1, outside 0\.\.2"),
    (lambda ix: ix.upsert(np.array([4.0]), torch.ones(1, 4), [0]), "ids must have an integer dtype"),
    (lambda ix: ix.upsert([4, 5], torch.ones(1, 4), [0, 0]), "mismatched lengths"),
    (lambda ix: ix.upsert([4], "abc", [0]), "torch tensor or numpy array"),
    (lambda ix: ix.search_other_class(torch.ones(1, 4), [0], k=0), "k must be a positive integer"),
    (lambda ix: ix.search_other_class(torch.ones(1, 4), [0], k=1.5), "k must be a positive integer"),
    (lambda ix: ix.search_other_class(torch.ones(2, 3), [0, 1]), "dimension 3"),
    (lambda ix: ix.search_other_class(torch.ones(2, 4), [0]), "mismatched lengths"),
    (lambda ix: ix.search_same_class(torch.ones(1, 4), [0], query_ids=[0.5]), "integer dtype"),
    (lambda ix: ix.search_other_class(torch.full((1, 4), float("nan")), [0]), "NaN"),
])
def test_input_errors(index, call, match):
    n = len(index)
    with pytest.raises(IndexInputError, match=match):
        call(index)
    assert len(index) == n  # nothing half-written


def test_errors_are_value_errors_and_one_sentence():
    with pytest.raises(ValueError) as e:
        ExactIndex(4, 2).upsert([1], torch.ones(1, 3), [0])
    assert str(e.value).count(".") == 1 and str(e.value).endswith(".")


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(IndexInputError, match="kinds are " + ", ".join(KINDS)):
        make_index("annoy", 4, 2)


@pytest.mark.parametrize("kw, match", [
    ({"nlist": 0}, "nlist must be a positive integer"),
    ({"nprobe": "many"}, "nprobe must be a positive integer"),
    ({"strategy": "magic"}, "strategy must be one of"),
    ({"bogus": 1}, "unknown parameter"),
    ({"refresh_every": -1}, "refresh_every"),
    ({"m": 5}, "m=5 must divide the dimension 4"),
])
def test_bad_parameters(kw, match):
    pytest.importorskip("faiss")
    with pytest.raises(IndexInputError, match=match):
        make_index("ivfpq", 4, 2, **kw)


def test_bad_constructor_arguments():
    with pytest.raises(IndexInputError, match="dim must be"):
        ExactIndex(0, 2)
    with pytest.raises(IndexInputError, match="num_classes must be"):
        ExactIndex(4, 0)
    with pytest.raises(IndexInputError, match="device must be"):
        ExactIndex(4, 2, device="tpu")
    with pytest.raises(IndexInputError, match="unknown parameter"):
        make_index("exact", 4, 2, nprobe=3)


def test_cagra_needs_cuda():
    pytest.importorskip("faiss")
    with pytest.raises(IndexInputError, match="cagra' needs device 'cuda'"):
        make_index("cagra", 4, 2)


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    ix = make_index("exact", 4, 2)  # the exact engine needs only torch
    ix.upsert([1], torch.ones(1, 4), [1])
    assert ix.search_other_class(torch.ones(1, 4), [0]).ids.item() == 1
    with pytest.raises(FaissUnavailableError, match=r'pip install "nil\[cpu\]".*"nil\[gpu\]"'):
        make_index("ivf", 4, 2)
    assert issubclass(FaissUnavailableError, ImportError)


def test_import_without_faiss_in_a_fresh_interpreter():
    code = ("import sys; sys.modules['faiss'] = None\n"
            "import faiss_index, torch\n"
            "ix = faiss_index.make_index('exact', 2, 2); ix.upsert([0], torch.ones(1, 2), [0])\n"
            "try:\n    faiss_index.make_index('ivfpq', 2, 2)\n"
            "except ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(__import__("pathlib").Path(faiss_index.__file__).parents[1]))
    assert out.returncode == 0, out.stderr
    assert 'ERR faiss is not installed; install it with pip install "nil[cpu]"' in out.stdout


def test_cpu_only_faiss_with_cuda_names_the_gpu_extra():
    faiss = pytest.importorskip("faiss")
    from faiss_index.engines.faiss_lib import gpu_count, import_faiss

    if gpu_count(faiss):
        pytest.skip("this faiss has GPU support")
    with pytest.raises(FaissUnavailableError, match=r'no GPU support.*pip install "nil\[gpu\]"'):
        import_faiss(torch.device("cuda"))
