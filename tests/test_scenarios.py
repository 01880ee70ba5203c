"""``pyvmm scenario``: every scenario this host can run runs for real and the kernel answers as expected (the
others skip, naming what the host lacks: the arm64 and protected-VM ones run in the lab); the catalogue is
well formed; the CLI lists, runs, prints and exits as documented."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from pyvmm import cli
from pyvmm.arch import machine_name
from pyvmm.kvm.errors import ConfigError
from pyvmm.memory.backing import BackingKind, BackingSpec
from pyvmm.outcome import ExitKind
from pyvmm.scenarios import HostFacts, Verdict, catalogue, find, run_scenario, scenarios
from pyvmm.scenarios.model import (
    MEMTOUCH,
    NAME_RE,
    Alternative,
    Answer,
    Confinement,
    Expected,
    MiB,
    Placeholder,
    Scenario,
    Slot,
    Target,
)
from pyvmm.scenarios.text import result_text
from tests.conftest import ROOT, run_cli

CATALOGUE = scenarios()
EXAMPLE_PLACEHOLDERS = {Placeholder.TMP: "/tmp/x", Placeholder.DISK: "/var/tmp/x", Placeholder.CMA_HEAP: "reserved"}


@pytest.fixture(scope="module")
def facts(kvm_device, huge_pages, request):  # huge_pages: pkvm-hugetlb's 4 free pages
    if machine_name() == "x86_64":
        request.getfixturevalue("x86_firmware")  # built (make -C firmware/x86_64)
    return HostFacts(kvm_device)


# --- the catalogue --------------------------------------------------------------------------------------------
def test_catalogue_is_well_formed():
    names = [s.name for s in CATALOGUE]
    assert len(names) >= 12 and len(set(names)) == len(names)
    for s in CATALOGUE:
        assert NAME_RE.fullmatch(s.name), s.name
        assert s.title and len(s.explanation) > 200, s.name
        assert s.expected.answer.outcome is not None or s.expected.answer.call is not None, s.name
        arches = ("x86_64", "arm64") if s.arch is Target.ANY else (s.arch.value,)
        if s.guest is not None:  # the guest's source is there for every arch it runs on
            for arch in arches:
                assert os.path.exists(os.path.join(ROOT, "firmware", arch, f"{s.guest.name}.S")), (s.name, arch)
        for slot in s.slots:
            text = slot.backing
            for placeholder in slot.placeholders:
                text = text.replace(placeholder.value, EXAMPLE_PLACEHOLDERS[placeholder])
            if text != "udmabuf:memfd":  # that spelling arrives with the udmabuf change (its scenario says so)
                assert BackingSpec.parse(text).kind is slot.kind, (s.name, text)
        for step in s.steps:
            assert step.describe(), (s.name, step)
        if s.protected:
            assert s.arch is Target.ARM64, s.name


def test_the_issue_classes_are_covered():
    """The classes issue 9 lists, each with the kernel's answer the lab measures (tests/test_arm64_pkvm.py)."""
    fault = ExitKind.FAULT
    want = {
        "pkvm-udmabuf": Answer(fault, call="KVM_RUN", errno="EFAULT", slot=0),
        "pkvm-udmabuf-memfd": Answer(ExitKind.GUEST_EXIT, status=0),
        "pkvm-guest-memfd": Answer(fault, call="KVM_RUN", errno="EIO", slot=0),
        "pkvm-file": Answer(fault, call="KVM_RUN", errno="EIO", slot=0),
        "pkvm-hugetlb": Answer(fault, call="KVM_RUN", errno="EIO", slot=0),
        "pkvm-host-read": Answer(fault, call="KVM_RUN", errno="EFAULT"),
        "pkvm-memlock": Answer(fault, call="KVM_RUN", errno="ENOMEM"),
        "pkvm-slot-delete": Answer(call="KVM_SET_USER_MEMORY_REGION", errno="EPERM"),
        "pkvm-readonly-slot": Answer(call="KVM_SET_USER_MEMORY_REGION", errno="EPERM"),
        "pkvm-dma-heap-system": Answer(fault, call="KVM_RUN", errno="EFAULT", slot=0),
        "pkvm-dma-heap-cma": Answer(fault, call="KVM_RUN", errno="EFAULT", slot=0),
        "nisv-readonly-writeback": Answer(fault, exit_reason="KVM_EXIT_ARM_NISV", slot=1),
        "readonly-slot-write": Answer(ExitKind.HALT, rom_writes=1),
        "file-truncated": Answer(fault, call="KVM_RUN", errno="EFAULT"),
        "hugetlb-exhausted": Answer(call="mmap", errno="ENOMEM"),
    }
    for name, answer in want.items():
        assert find(name).expected.answer == answer, name
    # where pyvmm refuses first, the scenario shows both: pyvmm's refusal and the kernel's own answer
    for name in ("pkvm-memlock", "pkvm-slot-delete", "pkvm-readonly-slot", "pkvm-host-read", "memslot-overlap"):
        assert find(name).expected.pyvmm_refuses, name
    assert find("pkvm-memlock").confinement == Confinement(memlock=0)
    assert find("pkvm-udmabuf-memfd").slots[0].backing == "udmabuf:memfd"
    assert find("pkvm-dma-heap-cma").slots[0].backing == "dma-heap:{cma_heap}"
    assert find("pkvm-file").slots[0].placeholders == {Placeholder.DISK}


def test_needs_follow_from_the_setup():
    from pyvmm.scenarios.model import Feature

    assert {Feature.PKVM, Feature.MEMLOCK, Feature.UDMABUF, Feature.GUEST_BUILT} <= set(find("pkvm-udmabuf").features())
    assert Feature.UDMABUF_MEMFD in find("pkvm-udmabuf-memfd").features()
    assert Feature.CMA_HEAP in find("pkvm-dma-heap-cma").features()
    assert Feature.DMA_HEAP in find("pkvm-dma-heap-system").features()
    assert {Feature.HUGETLBFS, Feature.FREE_HUGE_PAGES} <= set(find("pkvm-hugetlb").features())
    assert Feature.DISK_DIRECTORY in find("pkvm-file").features()
    assert Feature.WITHOUT_CAP_IPC_LOCK in find("pkvm-memlock").features()
    assert Feature.MEMLOCK not in find("pkvm-memlock").features()  # it sets its own limit
    assert Feature.READONLY_MEM in find("readonly-slot-write").features()
    assert Feature.FIXED_HUGE_PAGE_POOL in find("hugetlb-exhausted").features()
    assert find("memslot-overlap").features() == ()


def test_answers_leave_open_what_they_do_not_say():
    observed = Answer(ExitKind.FAULT, call="KVM_RUN", errno="EFAULT", slot=0, rom_writes=0)
    assert Answer(ExitKind.FAULT, call="KVM_RUN", errno="EFAULT").matches(observed)
    assert not Answer(ExitKind.FAULT, call="KVM_RUN", errno="EIO").matches(observed)
    assert not Answer(ExitKind.FAULT, slot=1).matches(observed)
    alt = Alternative(Answer(ExitKind.FAULT, exit_reason="KVM_EXIT_MMIO", slot=1), "emulating hosts", "why")
    expected = Expected(Answer(ExitKind.FAULT, call="KVM_RUN", errno="EFAULT"), alternatives=(alt,))
    assert expected.match(observed, refused=False) == "expected"
    assert expected.match(observed, refused=True) is None  # pyvmm refused when it should not have
    assert expected.match(Answer(ExitKind.FAULT, exit_reason="KVM_EXIT_MMIO", slot=1), False) == "emulating hosts"
    assert expected.match(Answer(ExitKind.FAULT, exit_reason="KVM_EXIT_MMIO", slot=0), False) is None
    assert Answer.from_dict(observed.to_dict()) == observed
    assert Answer(call="mmap").text() == "mmap -> success"
    assert Answer(ExitKind.GUEST_EXIT, status=0x51).text() == "guest-exit 0x51"


def test_unknown_scenario_names_the_close_ones():
    with pytest.raises(ConfigError, match=r"unknown scenario 'pkvm-udmabu' .*did you mean pkvm-udmabuf"):
        find("pkvm-udmabu")


# --- every scenario, for real ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", CATALOGUE, ids=[s.name for s in CATALOGUE])
@pytest.mark.timeout(600)
def test_scenario(facts, scenario):
    why = facts.why_not(scenario)
    if why:
        pytest.skip(why)
    result = run_scenario(scenario, facts)
    if result.verdict is Verdict.SKIPPED:
        pytest.skip(result.skipped)
    assert result.verdict is Verdict.MATCH, result_text(result, facts.machine)
    obs = result.observation
    assert bool(obs.refusals) == scenario.expected.pyvmm_refuses
    if obs.answer.outcome is ExitKind.FAULT:  # pyvmm explains every fault
        assert obs.likely_cause, result_text(result, facts.machine)


@pytest.mark.timeout(300)
def test_confined_child_runs_without_cap_ipc_lock(facts):
    """The memlock scenario's machinery on a normal VM (which does not charge RLIMIT_MEMLOCK, so it runs)."""
    if not os.path.exists(os.path.join(ROOT, "firmware", machine_name(), "build", "memtouch")):
        pytest.skip("memtouch is not built")
    probe = Scenario(name="confined-probe", title="t", arch=Target.ANY, protected=False,
                     slots=(Slot(0, 4 * MiB, "memfd"),), guest=MEMTOUCH, confinement=Confinement(memlock=0),
                     expected=Expected(Answer(ExitKind.GUEST_EXIT, status=0)), explanation="x")
    why = facts.why_not(probe)
    if why:
        pytest.skip(why)
    result = run_scenario(probe, facts)
    assert result.verdict is Verdict.MATCH, result_text(result, facts.machine)
    uid = 65534 if os.geteuid() == 0 else os.getuid()
    assert result.observation.notes[0] == (f"confined child process: uid {uid}, RLIMIT_MEMLOCK 0 bytes, "
                                           "no CAP_IPC_LOCK")
    assert "errors=0x0000000000000000" in result.observation.console[-1]


@pytest.mark.timeout(300)
def test_after_run_step_on_a_normal_vm(facts):
    """DeleteSlot's path where nothing refuses: a normal VM deletes a slot after its run, and the kernel agrees."""
    from pyvmm.scenarios.catalogue import ABOVE_RAM
    from pyvmm.scenarios.model import HELLO
    from pyvmm.scenarios.steps import DeleteSlot

    probe = Scenario(name="delete-probe", title="t", arch=Target.ANY, protected=False,
                     slots=(Slot(0, 4 * MiB, "anon"), Slot(ABOVE_RAM, 64 * 1024, "memfd")), guest=HELLO,
                     steps=(DeleteSlot(1),), expected=Expected(Answer(call="KVM_SET_USER_MEMORY_REGION")),
                     explanation="x")
    why = facts.why_not(probe)
    if why:
        pytest.skip(why)
    result = run_scenario(probe, facts)
    assert result.verdict is Verdict.MATCH, result_text(result, facts.machine)
    assert result.observation.refusals == [] and result.observation.outcome.startswith(("halt", "power-off"))


# --- the CLI ----------------------------------------------------------------------------------------------------
def _runnable(facts) -> list[Scenario]:
    return [s for s in CATALOGUE if not facts.why_not(s)]


@pytest.mark.timeout(60)
def test_cli_list(facts):
    res = run_cli("scenario", "list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["SCENARIO", "ARCH/VM", "HERE", "TITLE"]
    for s in CATALOGUE:
        row = next(line for line in lines if line.startswith(s.name + " "))
        assert f"{s.arch.value}/{s.vm_kind}" in row and s.title in row
        why = facts.why_not(s)
        assert row.split()[2] == ("no" if why else "yes")
        if why:
            assert f"  {s.name}: {why[:40]}" in res.stdout
    data = json.loads(run_cli("scenario", "list", "--json").stdout)
    assert [d["name"] for d in data] == [s.name for s in CATALOGUE]
    for d in data:
        assert d["runs_here"] == (d["why_not"] is None)
        assert d["scenario"]["expected"]["answer"] and d["scenario"]["explanation"]


@pytest.mark.timeout(120)
def test_cli_run_one_prints_the_whole_story(facts):
    res = run_cli("scenario", "run", "memslot-overlap")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert out.startswith("memslot-overlap: a memslot overlapping another: EEXIST\n")
    assert "kvm_check_memslot_overlap" in out  # the explanation
    assert "setup:\n  VM: normal" in out and "slot 1: gpa " in out
    assert "expected:\n  pyvmm refuses first, then the kernel answers: KVM_SET_USER_MEMORY_REGION -> EEXIST" in out
    assert "pyvmm refused: region at " in out and "overlaps slot 0" in out
    assert "kernel's answer: KVM_SET_USER_MEMORY_REGION -> EEXIST" in out and "errno: EEXIST (File exists)" in out
    assert out.rstrip().endswith("verdict: match")


@pytest.mark.timeout(120)
def test_cli_run_one_json(facts):
    if facts.why_not(find("file-truncated")):
        pytest.skip(facts.why_not(find("file-truncated")))
    res = run_cli("scenario", "run", "file-truncated", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(res.stdout)
    assert data["verdict"] == "match" and data["skipped"] is None
    assert data["scenario"]["slots"][1]["backing"] == "file:{tmp}/guest-ram.img"
    assert data["scenario"]["steps"][0]["step"] == "TruncateFile" and data["scenario"]["steps"][0]["slot"] == 1
    observed = data["observed"]
    assert observed["answer"]["outcome"] == "fault"
    assert any("0x0 bytes long" in c for c in observed["likely_cause"])  # the report's cause: the truncated file
    assert observed["report"]["faulting_slot"] == 1 or observed["answer"]["errno"] == "EFAULT"


@pytest.mark.timeout(1800)  # in the lab: every arm64 scenario, some of which write 8 MiB in an emulated machine
def test_cli_run_all(facts):
    res = run_cli("scenario", "run", "--all", timeout=1700)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["SCENARIO", "EXPECTED", "OBSERVED", "VERDICT"]
    runnable = {s.name for s in _runnable(facts)}
    for s in CATALOGUE:
        row = next(line for line in lines if line.startswith(s.name + " "))
        assert s.expected.answer.text() in row
        assert row.rstrip().endswith("match") if s.name in runnable else "  skipped: " in row, row
    assert lines[-1] == f"{len(CATALOGUE)} scenarios: {len(runnable)} match, 0 mismatch, " \
                        f"{len(CATALOGUE) - len(runnable)} skipped"


@pytest.mark.timeout(300)
def test_cli_run_all_json(facts, monkeypatch, capsys):
    """--all --json, in-process on a short catalogue (the whole one ran through the CLI above)."""
    short = (find("memslot-overlap"), find("hugetlb-exhausted"), find("pkvm-udmabuf"))
    monkeypatch.setattr(catalogue, "CATALOGUE", short)
    assert cli.main(["--kvm-device", facts.kvm_path, "scenario", "run", "--all", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["scenario"]["name"] for d in data] == [s.name for s in short]
    for d, s in zip(data, short):
        why = facts.why_not(s)
        assert d["verdict"] == ("skipped" if why else "match") and d["skipped"] == why
        assert (d["observed"] is None) == bool(why)
        assert d["scenario"]["expected"]["pyvmm_refuses"] == s.expected.pyvmm_refuses


@pytest.mark.timeout(60)
def test_cli_run_a_scenario_this_host_cannot_run(facts):
    lacking = next((s for s in CATALOGUE if facts.why_not(s)), None)
    if lacking is None:
        pytest.skip("this host runs every scenario")
    res = run_cli("scenario", "run", lacking.name)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"verdict: skipped: {facts.why_not(lacking)[:40]}" in " ".join(res.stdout.split())
    assert "observed:\n  (not run)" in res.stdout and "Traceback" not in res.stderr


@pytest.mark.parametrize("args, message", [
    (["scenario", "run", "no-such-scenario"], "unknown scenario 'no-such-scenario'"),
    (["scenario", "run"], "name a scenario to run, or give --all"),
    (["scenario", "run", "memslot-overlap", "--all"], "name one scenario or give --all (not both)"),
    (["scenario"], "required: ACTION"),
    (["scenario", "frobnicate"], "invalid choice"),
])
@pytest.mark.timeout(60)
def test_cli_bad_input_is_one_line_and_status_2(kvm_device, args, message):
    res = run_cli(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert res.stdout == ""


@pytest.mark.timeout(60)
def test_cli_help_texts():
    for args in (["scenario", "--help"], ["scenario", "list", "--help"], ["scenario", "run", "--help"]):
        res = run_cli(*args)
        assert res.returncode == 0 and "usage: pyvmm scenario" in res.stdout, args
    assert "--all" in run_cli("scenario", "run", "--help").stdout
    assert "scenario" in run_cli("--help").stdout


@pytest.mark.timeout(120)
def test_cli_exit_status_on_a_mismatch(facts, monkeypatch, capsys):
    """A scenario whose expectation is wrong: --all and run NAME both exit 1 and say MISMATCH."""
    right = find("memslot-overlap")
    wrong = dataclasses.replace(right, name="memslot-overlap-wrong", expected=Expected(
        Answer(call="KVM_SET_USER_MEMORY_REGION", errno="EPERM"), pyvmm_refuses=True))
    monkeypatch.setattr(catalogue, "CATALOGUE", (right, wrong))
    assert cli.main(["--kvm-device", facts.kvm_path, "scenario", "run", "--all"]) == cli.EXIT_FAULT
    out = capsys.readouterr().out
    assert "memslot-overlap-wrong" in out and "MISMATCH" in out and "2 scenarios: 1 match, 1 mismatch, 0 skipped" in out
    assert cli.main(["--kvm-device", facts.kvm_path, "scenario", "run", "memslot-overlap-wrong"]) == cli.EXIT_FAULT
    assert capsys.readouterr().out.rstrip().endswith("verdict: MISMATCH")
    assert cli.main(["--kvm-device", facts.kvm_path, "scenario", "run", "memslot-overlap"]) == 0


def test_a_scenario_that_breaks_is_a_mismatch_and_the_rest_still_run(facts, monkeypatch, capsys):
    """A step or the confined child failing must not stop --all: that scenario is a MISMATCH, with the reason."""
    from pyvmm.scenarios import runner

    right = find("memslot-overlap")
    broken = dataclasses.replace(right, name="memslot-overlap-broken")
    real_observe = runner.observe

    def observe(scenario, kvm):
        if scenario.name == broken.name:
            raise ConfigError("the step could not be done")
        return real_observe(scenario, kvm)

    monkeypatch.setattr(runner, "observe", observe)
    monkeypatch.setattr(catalogue, "CATALOGUE", (broken, right))
    assert cli.main(["--kvm-device", facts.kvm_path, "scenario", "run", "--all"]) == cli.EXIT_FAULT
    out = capsys.readouterr().out
    assert "MISMATCH: ConfigError: the step could not be done" in out
    assert "2 scenarios: 1 match, 1 mismatch, 0 skipped" in out


def test_udmabuf_memfd_spelling_is_known_or_its_scenario_says_why(facts):
    """The fix's spelling comes with the udmabuf change; until then its scenario skips with the reason."""
    try:
        BackingSpec.parse("udmabuf:memfd")
    except ConfigError:
        scenario = find("pkvm-udmabuf-memfd")
        if scenario.arch.fits(facts.machine):
            assert "udmabuf:memfd" in (facts.why_not(scenario) or "")
        pytest.skip("BackingSpec.parse does not accept udmabuf:memfd yet")
    assert BackingSpec.parse("udmabuf:memfd").kind is BackingKind.UDMABUF
