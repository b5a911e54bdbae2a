import pytest

from dogtl.core.diskspace import free_bytes, require_free_space
from dogtl.core.errors import DiskSpaceError


def test_refuses_a_write_larger_than_the_free_space(tmp_path):
    free = free_bytes(tmp_path / "not" / "yet" / "made.h5")
    assert free > 0
    require_free_space(tmp_path / "cache.h5", 1024, "the feature cache")
    with pytest.raises(DiskSpaceError, match=r"the feature cache needs about .* MB .*free .*rerun"):
        require_free_space(tmp_path / "cache.h5", free * 2, "the feature cache")
