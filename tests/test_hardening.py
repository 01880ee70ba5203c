"""Bad input, class by class: every member is one line on stderr, exit 2, no traceback, and (for input that can be
known before the VM exists) no KVM_CREATE_VM.  Property-based tests of the parsers: anything either parses or
raises the one-line ConfigError, nothing else escapes."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm import cli
from pyvmm.kvm import Kvm
from pyvmm.kvm.errors import ConfigError, PyvmmError
from pyvmm.loader import read_image
from pyvmm.memory.backing import BackingSpec
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    """One of every kind of path that is not a regular file, plus an empty and a missing one."""
    d = tmp_path_factory.mktemp("odd")
    fifo = d / "fifo"
    os.mkfifo(fifo)
    sock_path = d / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    empty = d / "empty"
    empty.write_bytes(b"")
    yield {"fifo": str(fifo), "socket": str(sock_path), "directory": str(d), "/dev/zero": "/dev/zero",
           "/dev/null": "/dev/null", "empty": str(empty), "missing": str(d / "missing")}
    sock.close()


EXPECT = {"fifo": "a FIFO", "socket": "a socket", "directory": "a directory", "/dev/zero": "a character device",
          "/dev/null": "a character device", "empty": "file is empty", "missing": "no such file"}


@pytest.fixture
def vm_creations(monkeypatch):
    """Every KVM_CREATE_VM the command makes (the real call still happens: this only records it)."""
    made = []
    real = Kvm.create_vm

    def recording(self, *args, **kwargs):
        made.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Kvm, "create_vm", recording)
    return made


def main(argv) -> int:
    """pyvmm's main() in this process; argparse's usage errors end in SystemExit, as they do for the command."""
    try:
        return cli.main(argv)
    except SystemExit as exit:
        return exit.code


def one_line_error(capsys, argv, vm_creations, says=None, vm_allowed=False):
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, (argv, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error: ") and "Traceback" not in err, (argv, err)
    if says is not None:
        assert says in lines[0], (argv, lines[0])
    if not vm_allowed:
        assert vm_creations == [], (argv, "a VM was created for input known to be bad beforehand")
    return lines[0]


# --- class 1: special files where a regular file is expected -------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(EXPECT))
@pytest.mark.parametrize("option", ["image", "--initrd", "--disk", "file:", "--pvmfw"])
def test_special_files_are_refused_before_anything_opens_them(capsys, vm_creations, odd_files, kind, option):
    path = odd_files[kind]
    if option == "file:" and kind in ("missing", "empty"):
        pytest.skip("file: creates a missing file and extends an empty one")
    argv = {"image": ["run", path], "--initrd": ["run", "--initrd", path], "--disk": ["run", "--disk", path],
            "file:": ["run", "-b", f"file:{path}"], "--pvmfw": ["run", "--pvmfw", path]}[option]
    line = one_line_error(capsys, argv, vm_creations)
    assert path in line and (EXPECT[kind] in line or kind == "empty" and "regular file" not in line), line


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "directory", "socket", "empty"])
def test_read_image_never_blocks_or_reads_forever(odd_files, kind):
    """The Python API too: a FIFO with no writer and /dev/zero come back at once as ConfigError."""
    result = []
    t = threading.Thread(target=lambda: result.append(_raises(read_image, odd_files[kind])), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), f"read_image({kind}) blocked"
    assert isinstance(result[0], ConfigError) and EXPECT[kind] in str(result[0])


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, says", [("directory", "a directory, not the KVM device"),
                                        ("fifo", "a FIFO, not the KVM device"),
                                        ("socket", "a socket, not the KVM device"),
                                        ("/dev/null", "a character device, but not the KVM device"),
                                        ("empty", "a regular file, not the KVM device"),
                                        ("missing", "does not exist")])
def test_kvm_device_that_is_not_kvm(capsys, odd_files, kind, says):
    for command in (["run"], ["caps"], ["check"]):
        status = main(["--kvm-device", odd_files[kind], *command])
        err = capsys.readouterr().err
        if command == ["check"] and kind == "missing":  # check: no KVM at all is "this host cannot make it"
            assert status == cli.EXIT_UNAVAILABLE
            continue
        assert status == 2 and len(err.splitlines()) == 1 and says in err, (command, err)


# --- class 2: numbers that are not finite or out of range -----------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e400", "0", "-1", "-0", "1e9", "abc", ""])
def test_timeouts_that_are_not_a_finite_positive_time(capsys, vm_creations, value):
    one_line_error(capsys, ["run", "--timeout", value], vm_creations, says="--timeout")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [
    ["-m", "0"], ["-m", "-1M"], ["-m", "nan"], ["-m", "inf"], ["-m", "1e9"], ["-m", "99999999999T"], ["-m", "0x"],
    ["--region=-1,4K"], ["--region", "0x1,"], ["--region", "nan,4K"], ["--region", "0x10000000000000000,4K"],
    ["--region", "0x40000000,inf"], ["--vcpus", "0"], ["--vcpus", "-3"], ["--vcpus", "1.5"], ["--vcpus", "nan"],
    ["--dma-pool", "nan"], ["--dma-pool", "-8M"], ["--dma-pool", "99999999999T"], ["--dma-pool", "3K"],
    ["--ipa-bits", "nan"], ["--ipa-bits", "inf"], ["-m", "9" * 5000], ["--region", "9" * 5000 + ",4K"],
    ["-b", "file:/tmp/" + "a" * 300], ["--vcpus", "9" * 5000],
])
def test_numbers_out_of_range_or_not_numbers(capsys, vm_creations, argv):
    one_line_error(capsys, ["run", *argv], vm_creations)


def test_vm_run_refuses_a_timeout_that_is_not_finite():
    """The Python API's own check (the CLI's is above); before any vCPU runs."""
    from pyvmm.arch import machine_name

    if machine_name() != "x86_64" or not os.path.exists("/dev/kvm"):
        pytest.skip("needs an x86_64 host with /dev/kvm")
    from pyvmm.vm import Vm

    with Vm() as vm:
        vm.add_memory(2 << 20)
        vm.create_vcpus(1)
        vm.boot()
        for bad in (float("nan"), float("inf"), -1.0, 0.0, 1e12):
            with pytest.raises(ConfigError, match="timeout"):
                vm.run(timeout=bad)


# --- class 3 and the rest: output paths and other options, before the VM ------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("option", ["--report-json", "--console-file"])
@pytest.mark.parametrize("where, says", [("directory", "is a directory"), ("missing/x.json", "does not exist"),
                                         ("fifo", "a FIFO; a regular file"), ("socket", "a socket; a regular file")])
def test_output_paths_are_checked_before_the_vm(capsys, vm_creations, odd_files, option, where, says):
    path = os.path.join(odd_files["missing"], "x.json") if where == "missing/x.json" else odd_files[where]
    one_line_error(capsys, ["run", option, path], vm_creations, says=says)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv, says", [
    (["--net", "user"], "the backend is a TAP"), (["--net", "tap,mac=zz"], "MAC"), (["--disk", ","], "bad disk"),
    (["--disk", "x,rw"], "bad disk option"), (["-b", "bogus"], "backing"), (["-b", "file:"], "needs an argument"),
    (["--cpu-features", "mte=on"], "unknown feature"), (["--sve-vector-lengths", "96"], "SVE vector length"),
    (["--console", "serial"], "invalid choice"),
])
def test_other_bad_options_before_the_vm(capsys, vm_creations, argv, says):
    one_line_error(capsys, ["run", *argv], vm_creations, says=says)


def test_bad_invocations_in_a_real_process_are_one_line():
    """The same promise end to end (interpreter start-up and exit included), for a sample of the classes."""
    for argv in (["run", "--timeout", "inf"], ["run", "/dev/zero"], ["--kvm-device", "/", "caps"],
                 ["run", "-m", "1e9"], ["run", "--region=-4096,4K"]):
        res = run_cli(*argv, timeout=60)
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, (argv, res.stderr)
        assert "Traceback" not in res.stderr and res.stdout == "", (argv, res.stderr)


# --- property-based: the parsers ----------------------------------------------------------------------------

SIZE_LIKE = st.one_of(
    st.text(max_size=20),
    st.from_regex(r"\s*(0x[0-9a-fA-F]{0,20}|-?[0-9]{0,25})\s*[KMGTkmgtP]?(i?B)?\s*", fullmatch=True),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0x", "", " ", "4K", "0", "2G", "0x1000", "99999999999T"]),
)


@settings(max_examples=400, deadline=None)
@given(SIZE_LIKE)
def test_parse_size_property(text):
    try:
        value = cli.parse_size(text)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert isinstance(value, int) and 0 < value <= cli.MAX_SIZE


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=40), st.builds(lambda a, b, c: f"{a},{b}{c}", SIZE_LIKE, SIZE_LIKE,
                                                  st.sampled_from(["", ",anon", ",memfd", ",file:", ",x", ",udmabuf:",
                                                                   ",dma-heap:system", ",udmabuf:memfd"]))))
def test_parse_region_property(text):
    try:
        gpa, size, backing = cli.parse_region(text)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert 0 <= gpa < cli.MAX_SIZE and 0 < size <= cli.MAX_SIZE and isinstance(backing, BackingSpec)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=30), st.builds(lambda k, s, a: k + s + a,
                                                  st.sampled_from(["anon", "memfd", "memfd-hugetlb", "guest-memfd",
                                                                   "udmabuf", "dma-heap", "file", "bogus", ""]),
                                                  st.sampled_from(["", ":", "::"]), st.text(max_size=10))))
def test_backing_parse_property(text):
    try:
        spec = BackingSpec.parse(text)
    except PyvmmError as err:
        assert isinstance(err, ConfigError) and "\n" not in str(err), repr(err)
        return
    assert BackingSpec.parse(str(spec)) == spec  # what it prints, it reads back


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=20), st.floats(allow_nan=True, allow_infinity=True).map(repr)))
def test_timeout_parse_property(text):
    import argparse

    try:
        value = cli._timeout(text)
    except argparse.ArgumentTypeError as err:
        assert "\n" not in str(err)
        return
    assert 0 < value <= cli.MAX_TIMEOUT


# --- the exit-status table, end to end ------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_each_documented_exit_status_from_the_case_it_names(x86_firmware):
    """Every row of `pyvmm run --help`'s table, produced by a real run of the case the row names."""
    import select
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT, default_signals

    def guest(name, *extra, send=None):
        cmd = [sys.executable, "-m", "pyvmm", "run", os.path.join(x86_firmware, name), "-m", "4M", *extra]
        if send is None:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                                  stdin=subprocess.DEVNULL)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                preexec_fn=default_signals,
                                stdin=subprocess.DEVNULL)
        assert select.select([proc.stdout], [], [], 30)[0], "the guest printed nothing"
        proc.stdout.readline()  # the guest runs
        proc.send_signal(send)
        out, err = proc.communicate(timeout=30)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    cases = {
        "0": (guest("hello"), "pyvmm: halt"),
        "N": (guest("shutdown-exit"), "pyvmm: guest-exit"),  # status 0x42 through the debug-exit port
        "1": (guest("shutdown-triple"), "fault report"),
        "2": (run_cli("run", "--timeout", "nan"), "pyvmm: error:"),
        "124": (guest("spin", "-t", "0.5"), "pyvmm: timeout"),
        "129": (guest("spin", send=signal.SIGHUP), "SIGHUP"),
        "130": (guest("spin", send=signal.SIGINT), "SIGINT"),
        "143": (guest("spin", send=signal.SIGTERM), "SIGTERM"),
    }
    assert list(cases) == [status for status, _ in cli.EXIT_STATUSES]  # one case per documented row
    for status, (res, says) in cases.items():
        expected = 0x42 if status == "N" else int(status)
        assert res.returncode == expected and says in res.stderr and "Traceback" not in res.stderr, (status, res.stderr)


def test_readme_has_the_exit_status_table():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = f.read()
    for status, meaning in cli.EXIT_STATUSES:
        assert f"| {status} | {meaning} |" in readme, status


@pytest.mark.timeout(60)
def test_a_reader_that_goes_away_is_not_an_error():
    """`pyvmm caps | head -1` (every command, not only run) and a stdout closed from the start (`>&-`)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    for argv in (["caps"], ["scenario", "list"], ["run", "--help"]):
        proc = subprocess.Popen([sys.executable, "-m", "pyvmm", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=ROOT, stdin=subprocess.DEVNULL)
        proc.stdout.read(10)
        proc.stdout.close()  # the reader leaves after a few bytes
        err = proc.stderr.read().decode()
        proc.wait(30)
        assert proc.returncode in (0, 2) and "Traceback" not in err and "BrokenPipe" not in err, (argv, err)
    if os.path.exists("/dev/kvm"):
        res = subprocess.run(f"exec {sys.executable} -m pyvmm run >&-", shell=True, capture_output=True, text=True,
                             cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
        assert res.returncode == 0 and "Traceback" not in res.stderr and "fault report" not in res.stderr, res.stderr
