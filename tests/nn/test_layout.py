import pytest
import torch

from pyro_subnet.nn import SiteLayout


@pytest.fixture
def layout():
    return SiteLayout([("a.weight", (3, 2)), ("a.bias", (3,)), ("b", (2, 2, 2))])


def test_dim_and_slices(layout):
    assert layout.dim == 6 + 3 + 8
    assert layout.slice("a.bias") == slice(6, 9)


def test_round_trip_is_exact(layout):
    theta = torch.randn(layout.dim, dtype=torch.float64)
    assert torch.equal(layout.flatten(layout.unflatten(theta)), theta)
    values = {n: torch.randn(4, 1, *s) for n, s in layout.shapes.items()}
    flat = layout.flatten(values)
    assert flat.shape == (4, 1, layout.dim)
    back = layout.unflatten(flat)
    for n in values:
        assert torch.equal(back[n], values[n])


def test_row_major_order(layout):
    theta = torch.arange(float(layout.dim))
    assert torch.equal(layout.unflatten(theta)["a.weight"], torch.arange(6.0).reshape(3, 2))


def test_locate_groups_indices_by_site(layout):
    idx = torch.tensor([10, 0, 7, 16])
    groups = {name: (pos.tolist(), local.tolist()) for name, pos, local in layout.locate(idx)}
    assert groups == {"a.weight": ([1], [0]), "a.bias": ([2], [1]), "b": ([0, 3], [1, 7])}


def test_errors_name_the_problem(layout):
    with pytest.raises(ValueError, match="no weight sites"):
        SiteLayout([])
    with pytest.raises(ValueError, match="last dimension"):
        layout.unflatten(torch.zeros(3))
    with pytest.raises(ValueError, match="missing"):
        layout.flatten({"a.weight": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"\[0, 17\)"):
        layout.locate(torch.tensor([17]))


def test_scalar_sites_round_trip():
    layout = SiteLayout([("s", ()), ("v", (2,))])
    theta = torch.arange(3.0)
    assert layout.unflatten(theta)["s"].shape == ()
    assert torch.equal(layout.flatten(layout.unflatten(theta)), theta)
    batched = torch.randn(4, 3)
    assert layout.unflatten(batched)["s"].shape == (4,)
    assert torch.equal(layout.flatten(layout.unflatten(batched)), batched)
