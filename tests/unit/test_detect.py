"""Detection through the fake NVML, for every shipped profile and every failure mode (#2)."""

from __future__ import annotations

import pytest

from agent.errors import ProfileError
from agent.hardware import detect
from agent.hardware.profiles import Profile, available_profiles, load_profile
from agent.hardware.types import MIB


def variant(name: str, gpu_changes: dict | None = None, **top) -> Profile:
    """A shipped profile with some fields changed (validated like a file would be)."""
    data = load_profile(name).model_dump()
    if gpu_changes:
        data["gpus"] = [{**g, **gpu_changes} for g in data["gpus"]]
    data.update(top)
    return Profile.model_validate(data)


@pytest.mark.parametrize("name", available_profiles())
def test_every_profile_detects_as_written(name):
    prof = load_profile(name)
    host = detect(prof, env={})
    assert host.source == f"profile:{name}"
    assert len(host.gpus) == len(prof.gpus)
    assert host.cpu_physical_cores == prof.host.physical_cores
    assert host.ram_total_bytes == prof.host.ram_total_mib * MIB
    for gpu, spec in zip(host.gpus, prof.gpus):
        assert gpu.name == spec.name and gpu.uuid == spec.uuid
        assert gpu.memory_total_bytes == spec.memory_total_mib * MIB
        # NVML v2: total = free + used + reserved, with the reserve reported apart from used.
        assert gpu.memory_free_bytes == (spec.memory_total_mib - spec.memory_used_mib) * MIB
        assert gpu.memory_used_bytes + gpu.memory_reserved_bytes == spec.memory_used_mib * MIB
        assert gpu.compute_capability == tuple(spec.compute_capability)
    n = len(prof.gpus)
    assert len(host.links) == n * (n - 1) // 2
    assert (host.gpu_reason is None) == (n > 0)


def test_homelab_box_has_no_p2p_and_no_nvlink():
    host = detect("rtx5090-rtx4090", env={})
    assert [g.name for g in host.gpus] == ["NVIDIA GeForce RTX 5090", "NVIDIA GeForce RTX 4090"]
    assert host.gpus[0].memory_total_bytes == 32607 * MIB
    assert host.gpus[1].memory_total_bytes == 24564 * MIB
    assert host.gpus[0].display_active is True and host.gpus[1].display_active is False
    (link,) = host.links
    assert (link.p2p, link.nvlink, link.nvlink_count) == (False, False, 0)
    # GeForce cards answer NotSupported for MIG: reported as None, not False.
    assert all(g.mig_enabled is None for g in host.gpus)
    assert {p.kind for p in host.gpus[0].processes} == {"graphics"}


def test_a100_x4_has_nvlink_between_every_pair():
    host = detect("a100-80gb-x4", env={})
    assert len(host.links) == 6
    assert all(l.nvlink and l.p2p and l.nvlink_count == 4 for l in host.links)
    assert all(g.mig_enabled is False for g in host.gpus)


def test_library_missing_gives_zero_gpus_and_the_reason():
    host = detect("cpu-only", env={})
    assert host.gpus == () and "NVML library not found" in host.gpu_reason


def test_driver_not_loaded():
    prof = variant("cpu-only", nvml="driver-not-loaded")
    assert detect(prof, env={}).gpu_reason == "NVIDIA driver not loaded"


def test_driver_present_but_no_devices():
    prof = variant("rtx4090", gpus=[], links=[])
    host = detect(prof, env={})
    assert host.gpus == ()
    assert host.gpu_reason == "NVIDIA driver loaded but it reports no GPUs"
    assert host.driver_version == load_profile("rtx4090").driver.version


def test_mig_enabled_is_reported():
    host = detect(variant("a100-40gb-x2", {"mig_enabled": True}), env={})
    assert all(g.mig_enabled is True for g in host.gpus)


def test_not_supported_queries_become_none():
    prof = variant("l4", {"unsupported": ["temperature", "power_limit", "utilization", "pcie", "display"]})
    (gpu,) = detect(prof, env={}).gpus
    assert gpu.temperature_c is None and gpu.power_limit_watts is None
    assert gpu.utilization_gpu_pct is None and gpu.pcie_generation is None and gpu.display_active is None
    assert gpu.memory_total_bytes > 0  # the rest is still read


def test_memory_v1_fallback_counts_the_reserve_as_used():
    spec = load_profile("rtx3090").gpus[0]
    (gpu,) = detect(variant("rtx3090", {"unsupported": ["memory_v2"]}), env={}).gpus
    assert gpu.memory_reserved_bytes == 0
    assert gpu.memory_used_bytes == spec.memory_used_mib * MIB


def test_processes_holding_memory_are_listed():
    (gpu,) = detect("rtx4090-shared", env={}).gpus
    big = max(gpu.processes, key=lambda p: p.used_bytes)
    assert big.used_bytes == 6144 * MIB and big.kind == "compute"


def test_cuda_visible_devices_by_index_renumbers_like_cuda():
    host = detect("rtx5090-rtx4090", env={"CUDA_VISIBLE_DEVICES": "1"})
    (gpu,) = host.gpus
    assert gpu.name == "NVIDIA GeForce RTX 4090"
    assert (gpu.index, gpu.nvml_index) == (0, 1)
    assert host.links == () and host.hidden_gpus == 1
    assert any("CUDA_VISIBLE_DEVICES" in n for n in host.notes)


def test_cuda_visible_devices_by_uuid_prefix_and_order():
    prof = load_profile("a100-80gb-x4")
    env = {"CUDA_VISIBLE_DEVICES": f"{prof.gpus[3].uuid[:12]},{prof.gpus[1].uuid}"}
    host = detect(prof, env=env)
    assert [g.uuid for g in host.gpus] == [prof.gpus[3].uuid, prof.gpus[1].uuid]
    assert [g.index for g in host.gpus] == [0, 1]
    (link,) = host.links
    assert (link.a, link.b) == (0, 1) and link.nvlink


def test_cuda_visible_devices_stops_at_an_unknown_entry():
    host = detect("a100-80gb-x4", env={"CUDA_VISIBLE_DEVICES": "2,9,0"})
    assert [g.nvml_index for g in host.gpus] == [2]
    assert any("'9'" in n for n in host.notes)


def test_cuda_visible_devices_empty_hides_everything():
    host = detect("rtx4090", env={"CUDA_VISIBLE_DEVICES": ""})
    assert host.gpus == () and "hides every GPU" in host.gpu_reason and host.hidden_gpus == 1


def test_real_nvml_path_on_this_machine_never_crashes():
    # With the real pynvml module: a GPU-less host gives a reason, a GPU host gives GPUs.
    host = detect(env={})
    assert host.cpu_logical_cores >= 1 and host.ram_total_bytes > 0
    assert bool(host.gpus) != bool(host.gpu_reason)


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: [", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("name: x\ndescription: y\n", "host"),
    ],
)
def test_bad_profile_files_are_explained(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_profile_rules_are_enforced():
    data = load_profile("rtx5090-rtx4090").model_dump()
    data["gpus"] = list(reversed(data["gpus"]))
    with pytest.raises(ValueError, match="PCI bus order"):
        Profile.model_validate(data)
    data = load_profile("a100-40gb-x2").model_dump()
    data["links"] = []
    with pytest.raises(ValueError, match="every GPU pair"):
        Profile.model_validate(data)


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(ProfileError, match="rtx5090-rtx4090"):
        load_profile("gtx9999")
