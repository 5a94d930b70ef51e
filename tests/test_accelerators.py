"""Accelerator probes on this machine (no Coral, no GPU), on fake sysfs trees, and with
small real delegate libraries compiled here."""

from __future__ import annotations

import _ctypes
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgeagent.errors import AcceleratorError
from edgeagent.hal.accel import (
    AUTO_ORDER,
    ProbeState,
    get_accelerator,
    probe_accelerators,
)
from edgeagent.hal.accel.cpu import CpuAccelerator
from edgeagent.hal.accel.edgetpu import EdgeTpuAccelerator
from edgeagent.hal.accel.fake import FakeAccelerator, FakeGpu
from edgeagent.hal.accel.gpu import GpuAccelerator
from edgeagent.hal.accel.litert_gpu import (
    LIBRARY,
    AdapterCheck,
    LiteRtGpuAccelerator,
    adapter_probe,
    litert_package_dir,
    run_adapter_check,
)

NOT_A_DELEGATE = _ctypes.__file__  # a real shared object without the plugin entry points

DELEGATE_C = r"""
#include <stdlib.h>
typedef void (*report_fn)(const char*);
void* tflite_plugin_create_delegate(char** keys, char** values, size_t n, report_fn report) {
#ifdef FAIL
    report("no Edge TPU device found (test delegate)");
    return NULL;
#else
    return malloc(64);
#endif
}
void tflite_plugin_destroy_delegate(void* delegate) { free(delegate); }
"""


def _compile_delegate(tmp_path: Path, *, fail: bool) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler to build a test delegate library")
    source = tmp_path / "delegate.c"
    source.write_text(DELEGATE_C)
    library = tmp_path / ("libfail.so" if fail else "libok.so")
    flags = ["-DFAIL"] if fail else []
    subprocess.run(
        [compiler, "-shared", "-fPIC", *flags, "-o", str(library), str(source)], check=True
    )
    return library


def _coral_root(tmp_path: Path, vendor: str = "18d1", product: str = "9302", speed: str = "5000"):
    device = tmp_path / "root/sys/bus/usb/devices/2-1"
    device.mkdir(parents=True)
    (device / "idVendor").write_text(vendor + "\n")
    (device / "idProduct").write_text(product + "\n")
    (device / "speed").write_text(speed + "\n")
    return tmp_path / "root"


@pytest.fixture(autouse=True)
def _no_library_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEAGENT_EDGETPU_LIB", raising=False)
    monkeypatch.delenv("EDGEAGENT_GPU_DELEGATE_LIB", raising=False)


# --- registry ------------------------------------------------------------------------


def test_registry_probes_in_auto_order_and_cpu_is_present() -> None:
    probes = probe_accelerators()
    assert [p.name for p in probes] == list(AUTO_ORDER) == ["edgetpu", "litert-gpu", "gpu", "cpu"]
    assert probes[-1].state is ProbeState.PRESENT


def test_unknown_accelerator_lists_the_known_ones() -> None:
    known = r"unknown accelerator 'npu'.*edgetpu, litert-gpu, gpu, cpu"
    with pytest.raises(AcceleratorError, match=known):
        get_accelerator("npu")
    with pytest.raises(AcceleratorError, match="unknown accelerator 'fake'"):
        get_accelerator("fake")


def test_get_accelerator_shares_one_instance_per_name() -> None:
    assert get_accelerator("edgetpu") is get_accelerator("edgetpu")
    assert get_accelerator("gpu").name == "gpu"


def test_importing_the_registry_imports_no_backend() -> None:
    code = (
        "import sys, edgeagent.hal.accel as a; "
        "print(sorted(m for m in sys.modules if m.startswith('edgeagent.hal.accel.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['edgeagent.hal.accel.base']"


# --- cpu -----------------------------------------------------------------------------


def test_cpu_probe_on_this_machine() -> None:
    probe = CpuAccelerator().probe()
    assert probe.state is ProbeState.PRESENT
    assert int(probe.details["cores"]) >= 1
    assert probe.details["machine"] == platform.machine()
    if platform.machine() == "x86_64" and "avx2" in Path("/proc/cpuinfo").read_text():
        assert "avx2" in probe.details["isa"].split()
    assert CpuAccelerator().delegates() == []
    assert CpuAccelerator().can_run(frozenset({"CONV_2D"})) is None


def test_cpu_probe_reads_a_raspberry_pi_5_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nBogoMIPS\t: 108.00\n"
        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
        "asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n\n"
        "processor\t: 1\nCPU part\t: 0xd0b\n\n"
        "Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
    )
    probe = CpuAccelerator(cpuinfo).probe()
    assert probe.details["cpu"] == "Cortex-A76"
    assert probe.details["isa"].split() == ["neon", "fp16", "dotprod"]
    assert probe.details["board"] == "Raspberry Pi 5 Model B Rev 1.0"


def test_cpu_probe_without_cpuinfo_still_present(tmp_path: Path) -> None:
    probe = CpuAccelerator(tmp_path / "missing").probe()
    assert probe.state is ProbeState.PRESENT
    assert "isa" not in probe.details


# --- edgetpu -------------------------------------------------------------------------


def test_edgetpu_absent_here_says_what_to_install(tmp_path: Path) -> None:
    probe = EdgeTpuAccelerator(root=tmp_path).probe()
    assert probe.state is ProbeState.ABSENT
    assert "apt install libedgetpu1-std" in probe.reason
    assert probe.details["devices"] == "none"
    with pytest.raises(AcceleratorError, match="Edge TPU is absent"):
        EdgeTpuAccelerator(root=tmp_path).delegates()


def test_edgetpu_absent_on_this_machine() -> None:
    probe = EdgeTpuAccelerator().probe()
    assert probe.state is ProbeState.ABSENT
    assert probe.reason


def test_edgetpu_runtime_without_device_is_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEAGENT_EDGETPU_LIB", NOT_A_DELEGATE)
    probe = EdgeTpuAccelerator(root=tmp_path).probe()
    assert probe.state is ProbeState.ABSENT
    assert probe.reason.endswith("but no Coral device on USB or PCIe")


def test_edgetpu_missing_override_path_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEAGENT_EDGETPU_LIB", str(tmp_path / "nope.so"))
    probe = EdgeTpuAccelerator(root=_coral_root(tmp_path)).probe()
    assert probe.state is ProbeState.ABSENT
    assert "nope.so, which does not exist" in probe.reason
    assert "a Coral is plugged in" in probe.reason


def test_edgetpu_library_that_is_not_a_delegate_is_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEAGENT_EDGETPU_LIB", NOT_A_DELEGATE)
    accelerator = EdgeTpuAccelerator(root=_coral_root(tmp_path, speed="480"))
    probe = accelerator.probe()
    assert probe.state is ProbeState.BROKEN
    assert "present but broken" in probe.reason
    assert "does not export tflite_plugin_create_delegate" in probe.reason
    assert probe.details["usb_speed"].startswith("USB2 (480 Mb/s): slow")
    with pytest.raises(AcceleratorError, match="present but broken"):
        accelerator.delegates()
    assert "Delegate.__del__" not in capfd.readouterr().err


def test_edgetpu_file_that_is_not_a_library_is_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "libedgetpu.so.1"
    junk.write_text("not an ELF file")
    monkeypatch.setenv("EDGEAGENT_EDGETPU_LIB", str(junk))
    probe = EdgeTpuAccelerator(root=_coral_root(tmp_path)).probe()
    assert probe.state is ProbeState.BROKEN
    assert "cannot load" in probe.reason
    assert "invalid ELF header" in probe.reason or "file too short" in probe.reason
    assert "Delegate.__del__" not in capfd.readouterr().err


def test_edgetpu_delegate_that_fails_to_create_is_broken_with_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEAGENT_EDGETPU_LIB", str(_compile_delegate(tmp_path, fail=True)))
    probe = EdgeTpuAccelerator(root=_coral_root(tmp_path)).probe()
    assert probe.state is ProbeState.BROKEN
    assert "no Edge TPU device found (test delegate)" in probe.reason


def test_edgetpu_present_with_a_loading_delegate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    library = _compile_delegate(tmp_path, fail=False)
    monkeypatch.setenv("EDGEAGENT_EDGETPU_LIB", str(library))
    accelerator = EdgeTpuAccelerator(root=_coral_root(tmp_path, "1a6e", "089a"))
    probe = accelerator.probe()
    assert probe.state is ProbeState.PRESENT, probe.reason
    assert probe.details["library"] == str(library)
    assert probe.details["usb_speed"] == "USB3 (5000 Mb/s)"
    assert "firmware not loaded yet" in probe.details["devices"]
    delegates = accelerator.delegates()
    assert len(delegates) == 1
    assert delegates[0]._get_native_delegate_pointer()


def test_edgetpu_pcie_device_without_driver_is_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEAGENT_EDGETPU_LIB", NOT_A_DELEGATE)
    pci = tmp_path / "sys/bus/pci/devices/0000:01:00.0"
    pci.mkdir(parents=True)
    (pci / "vendor").write_text("0x1ac1\n")
    (pci / "device").write_text("0x089a\n")
    probe = EdgeTpuAccelerator(root=tmp_path).probe()
    assert probe.state is ProbeState.BROKEN
    assert "gasket-dkms" in probe.reason


def test_edgetpu_probe_is_cached_until_fresh_or_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEAGENT_EDGETPU_LIB", str(_compile_delegate(tmp_path, fail=False)))
    root = _coral_root(tmp_path)
    now = [100.0]
    accelerator = EdgeTpuAccelerator(root=root, cache_s=10.0, clock=lambda: now[0])
    assert accelerator.probe().state is ProbeState.PRESENT
    shutil.rmtree(root / "sys/bus/usb/devices/2-1")  # the Coral is pulled out
    now[0] += 5
    assert accelerator.probe().state is ProbeState.PRESENT  # cached
    assert accelerator.probe(fresh=True).state is ProbeState.ABSENT
    now[0] += 20
    assert accelerator.probe().state is ProbeState.ABSENT
    with pytest.raises(AcceleratorError, match="absent"):
        accelerator.delegates()


def test_edgetpu_can_run_only_compiled_models() -> None:
    accelerator = EdgeTpuAccelerator()
    assert accelerator.can_run(frozenset({"edgetpu-custom-op", "QUANTIZE"})) is None
    reason = accelerator.can_run(frozenset({"CONV_2D"}))
    assert reason is not None
    assert "no edgetpu-custom-op" in reason
    assert "edgetpu_compiler" in reason


# --- gpu -----------------------------------------------------------------------------


def test_gpu_absent_here_explains_the_wheel_has_no_delegate(tmp_path: Path) -> None:
    probe = GpuAccelerator(root=tmp_path).probe()
    assert probe.state is ProbeState.ABSENT
    assert "does not ship this legacy GPU delegate" in probe.reason
    assert "litert-gpu" in probe.reason  # the way to the GPU that needs no build
    assert probe.details["render_nodes"] == "none"
    with pytest.raises(AcceleratorError, match="GPU delegate is absent"):
        GpuAccelerator(root=tmp_path).delegates()
    assert GpuAccelerator().can_run(frozenset({"CUSTOM"})) is None


def test_gpu_library_that_is_not_a_delegate_is_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEAGENT_GPU_DELEGATE_LIB", NOT_A_DELEGATE)
    probe = GpuAccelerator(root=tmp_path).probe()
    assert probe.state is ProbeState.BROKEN
    assert "is not a LiteRT external delegate" in probe.reason


def test_gpu_present_notes_the_render_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEAGENT_GPU_DELEGATE_LIB", str(_compile_delegate(tmp_path, fail=False)))
    (tmp_path / "dev/dri").mkdir(parents=True)
    (tmp_path / "dev/dri/renderD128").touch()
    probe = GpuAccelerator(root=tmp_path).probe()
    assert probe.state is ProbeState.PRESENT
    assert probe.details["render_nodes"] == "/dev/dri/renderD128"


# --- litert-gpu: LiteRT's own WebGPU accelerator -------------------------------------


def _real_gpu_probe() -> Any:
    probe = get_accelerator("litert-gpu").probe()
    if probe.state is ProbeState.PRESENT:
        pytest.skip("this machine has a Vulkan adapter; the test is about one without")
    return probe


def test_litert_gpu_here_is_absent_with_dawns_reason_and_the_driver_to_install() -> None:
    probe = _real_gpu_probe()  # the real child process, LiteRT and Dawn
    assert probe.state is ProbeState.ABSENT
    assert "no Vulkan adapter: Dawn reports 'No adapters found'" in probe.reason
    assert "mesa-vulkan-drivers" in probe.reason
    assert probe.details["library"].endswith(LIBRARY)
    assert get_accelerator("litert-gpu").present() is False


def test_litert_gpu_without_the_library_in_the_wheel_is_absent(tmp_path: Path) -> None:
    def no_check(model: Path) -> AdapterCheck:
        raise AssertionError("no adapter check without the library")

    probe = LiteRtGpuAccelerator(package_dir=tmp_path, check=no_check).probe()
    assert probe.state is ProbeState.ABSENT
    assert f"{LIBRARY} is not in the ai-edge-litert wheel ({tmp_path})" in probe.reason
    assert "ai-edge-litert>=2.3" in probe.reason


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        (AdapterCheck(-11, "", "INFO: creating the WebGPU device"), "crashed with SIGSEGV"),
        (AdapterCheck(-1, "", "", timed_out=True), "the GPU check hung"),
        (
            AdapterCheck(1, '{"compiled": false, "error": "VK_ERROR_INITIALIZATION_FAILED"}', ""),
            "the GPU check failed: VK_ERROR_INITIALIZATION_FAILED",
        ),
    ],
)
def test_litert_gpu_check_that_crashes_hangs_or_fails_otherwise_is_broken(
    check: AdapterCheck, expected: str
) -> None:
    accelerator = LiteRtGpuAccelerator(package_dir=litert_package_dir(), check=lambda _m: check)
    probe = accelerator.probe()
    assert probe.state is ProbeState.BROKEN
    assert expected in probe.reason
    assert accelerator.present() is False


def test_litert_gpu_check_of_a_file_that_is_not_a_model_is_broken(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a model")
    check = run_adapter_check(junk)  # the real child process
    probe = LiteRtGpuAccelerator(package_dir=litert_package_dir(), check=lambda _m: check).probe()
    assert check.returncode == 1
    assert probe.state is ProbeState.BROKEN
    assert probe.reason.startswith("the GPU check failed: ")


def test_litert_gpu_probe_is_cached() -> None:
    checks: list[Path] = []

    def check(model: Path) -> AdapterCheck:
        checks.append(model)
        return AdapterCheck(0, '{"compiled": true, "fully_accelerated": false}', "")

    now = [0.0]
    accelerator = LiteRtGpuAccelerator(
        package_dir=litert_package_dir(), check=check, cache_s=300, clock=lambda: now[0]
    )
    probe = accelerator.probe()
    assert probe.state is ProbeState.PRESENT
    assert "operators it lacks run on the CPU" in probe.reason
    assert accelerator.present()
    assert accelerator.probe() is probe
    now[0] = 301.0
    accelerator.probe()
    assert len(checks) == 2


def test_litert_gpu_runs_through_compiled_models_not_delegates() -> None:
    accelerator = get_accelerator("litert-gpu")
    assert accelerator.can_run(frozenset({"CUSTOM"})) is None
    with pytest.raises(AcceleratorError, match="CompiledModel API, not Interpreter delegates"):
        accelerator.delegates()


def test_fake_gpu_without_an_adapter_fails_as_dawn_does() -> None:
    accelerator = FakeGpu(adapter=False).accelerator()
    probe = accelerator.probe()
    assert probe.state is ProbeState.ABSENT
    assert "Dawn reports 'No adapters found'" in probe.reason
    assert "libvulkan.so.1" in probe.reason
    with pytest.raises(AcceleratorError, match=r"could not compile m\.tflite for the GPU"):
        accelerator.compile_model(Path("m.tflite"), 1)


def test_fake_gpu_lost_is_broken_until_restored() -> None:
    gpu = FakeGpu()
    accelerator = gpu.accelerator()
    assert accelerator.probe().state is ProbeState.PRESENT
    gpu.lose_device()
    assert accelerator.probe().state is ProbeState.BROKEN
    gpu.restore()
    assert accelerator.probe().state is ProbeState.PRESENT


# --- fake ----------------------------------------------------------------------------


def test_fake_present_runs_on_cpu_kernels() -> None:
    fake = FakeAccelerator()
    assert fake.probe().state is ProbeState.PRESENT
    assert fake.delegates() == []
    assert fake.loads == 1


def test_fake_broken_fails_like_load_delegate() -> None:
    fake = FakeAccelerator(state=ProbeState.BROKEN, reason="Failed to open device")
    assert fake.probe().reason == "Failed to open device"
    with pytest.raises(AcceleratorError, match=r"present but broken.*Failed to open device"):
        fake.delegates()


def test_fake_unplug_and_plug_in() -> None:
    fake = FakeAccelerator()
    fake.delegates()
    fake.unplug()
    assert fake.probe().state is ProbeState.ABSENT
    with pytest.raises(AcceleratorError, match="fake-tpu is absent"):
        fake.delegates()
    fake.plug_in()
    assert fake.delegates() == []
    assert fake.loads == 2


def test_fake_fail_on_load_probes_present_but_cannot_load() -> None:
    fake = FakeAccelerator(fail_on_load=True)
    assert fake.probe().state is ProbeState.PRESENT
    with pytest.raises(AcceleratorError, match="present but broken"):
        fake.delegates()
    fake.break_("USB transfer error")
    assert fake.probe().state is ProbeState.BROKEN


def test_fake_required_op() -> None:
    fake = FakeAccelerator(required_op="fake-custom-op")
    assert fake.can_run(frozenset({"fake-custom-op"})) is None
    assert fake.can_run(frozenset({"CONV_2D"})) == (
        "model is not compiled for fake-tpu (no fake-custom-op)"
    )


def test_litert_gpu_without_access_to_the_render_node_says_which_group(tmp_path: Path) -> None:
    """v3dv that cannot open /dev/dri/renderD128 lists no adapter either: the hint must
    then be the group, not a driver that is already installed."""
    node = tmp_path / "dev/dri/renderD128"
    node.parent.mkdir(parents=True)
    node.touch()
    gpu = FakeGpu(adapter=False)
    accelerator = LiteRtGpuAccelerator(
        package_dir=litert_package_dir(), check=gpu.check, root=tmp_path
    )
    probe = accelerator.probe()
    assert probe.details["render_nodes"] == "/dev/dri/renderD128"
    assert "process cannot open" not in probe.reason  # it can: the driver is missing
    # What the probe says when the node is there but locked (os.access is False for a
    # service user outside the render group; this test may run as root, who can open all).
    locked = adapter_probe("litert-gpu", gpu.check(Path("m")), {}, ["/dev/dri/renderD128"])
    assert locked.state is ProbeState.ABSENT
    assert "/dev/dri/renderD128 exists but this process cannot open it" in locked.reason
    assert "(render)" in locked.reason
