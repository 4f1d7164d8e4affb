"""Capacity formula C = max(min_capacity, ceil(cf*S*K/E)), rounded up."""

import pytest

from moejax import compute_capacity


@pytest.mark.parametrize('s,e,k,cf,min_c,mult,expected', [
    (8, 4, 2, 1.25, 4, 1, 5),      # ceil(1.25*8*2/4) = ceil(5.0) = 5
    (8, 4, 2, 1.25, 4, 4, 8),      # 5 rounded up to a multiple of 4
    (8, 4, 1, 1.0, 0, 1, 2),       # ceil(1*8*1/4) = 2
    (8, 4, 1, 1.0, 4, 1, 4),       # min_capacity wins over 2
    (10, 4, 1, 1.0, 0, 1, 3),      # ceil(2.5) = 3
    (3, 3, 2, 1.0, 0, 1, 2),       # ceil(1*3*2/3) = 2 (the hand case)
    (30, 1, 1, 0.1, 0, 1, 3),      # 0.1*30 = 3.0000000000000004 -> still 3
    (8, 1, 1, 2.0, 0, 1, 8),       # 16 capped at S = 8: never more than S
    (6, 1, 1, 2.0, 0, 4, 8),       # cap is S rounded up to multiple_of
    (8, 4, 2, None, 4, 1, 8),      # dropless: C = S
    (1024, 64, 2, 1.25, 4, 1, 40),  # ceil(1.25*1024*2/64) = 40
])
def test_capacity_formula(s, e, k, cf, min_c, mult, expected):
  assert compute_capacity(s, e, k, cf, min_c, mult) == expected


@pytest.mark.parametrize('kwargs,name', [
    (dict(capacity_factor=0.0), 'capacity_factor'),
    (dict(capacity_factor=-1.0), 'capacity_factor'),
    (dict(capacity_factor='big'), 'capacity_factor'),
    (dict(top_k=5), 'top_k'),
    (dict(top_k=0), 'top_k'),
    (dict(num_experts=0), 'num_experts'),
    (dict(multiple_of=0), 'multiple_of'),
    (dict(min_capacity=-1), 'min_capacity'),
    (dict(tokens_per_group=0), 'tokens_per_group'),
])
def test_capacity_bad_arguments_name_the_argument(kwargs, name):
  args = dict(tokens_per_group=8, num_experts=4, top_k=1, capacity_factor=1.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    compute_capacity(**args)
