"""Running a scenario for real and comparing what the kernel answered with what was expected.

A scenario's life: the VM (normal or protected), its memslots in order, the steps ``BEFORE_BOOT``, the vCPUs
and the guest, the steps ``BEFORE_RUN``, ``KVM_RUN``, the steps ``AFTER_RUN``.  Where pyvmm's own checks
refuse something before the kernel sees it (a memslot rule, the RLIMIT_MEMLOCK pre-check), the refusal is
recorded and the kernel is asked anyway, directly, because the point is what the kernel answers.  The first
answer of the kernel that ends the scenario (a failed call, or how the run ended) is the observation.

A scenario with a ``Confinement`` runs in a child process (``python -m pyvmm.scenarios.child``) that lowers
RLIMIT_MEMLOCK and drops CAP_IPC_LOCK first; it sends its observation back as JSON.
"""

from __future__ import annotations

import contextlib
import enum
import errno as errno_mod
import json
import os
import pickle
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from ..firmware import firmware_path
from ..kvm import Kvm
from ..kvm.errors import ConfigError, KvmError, MissingFeature, PyvmmError
from ..memory.backing import BackingSpec
from ..memory.regions import MemoryRegion
from ..outcome import Outcome
from ..vm import Vm
from .host import HostFacts, Workspace
from .model import Answer, Scenario, Slot, When

CONSOLE_LINES = 8  # of the guest's console, in an observation
CHILD_TIMEOUT_MARGIN = 60.0  # seconds a confined child gets beyond its scenario's run timeouts


class Verdict(enum.Enum):
    MATCH = "match"
    MISMATCH = "MISMATCH"
    SKIPPED = "skipped"


@dataclass
class Observation:
    """What happened: the kernel's answer, pyvmm's refusals on the way, and what pyvmm made of it."""

    answer: Answer
    refusals: list[str] = field(default_factory=list)  # pyvmm's own checks that said no before the kernel did
    outcome: str | None = None  # the run's outcome line ("fault: KVM_RUN on vCPU 0 failed with EFAULT ...")
    errno_meaning: str | None = None
    likely_cause: list[str] = field(default_factory=list)  # the fault report's
    report: dict | None = None  # the whole fault report (FaultReport.to_dict)
    notes: list[str] = field(default_factory=list)  # what the steps did and saw
    console: list[str] = field(default_factory=list)  # the guest's last lines

    def to_dict(self) -> dict:
        return {**asdict(self), "answer": self.answer.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "Observation":
        return cls(**{**data, "answer": Answer.from_dict(data["answer"])})


@dataclass
class Result:
    scenario: Scenario
    verdict: Verdict
    observation: Observation | None = None
    skipped: str | None = None  # why it could not run here
    matched: str | None = None  # "expected", or the alternative's hosts
    error: str | None = None  # the scenario itself failed (a step, the confined child): a MISMATCH


class RunContext:
    """One scenario's run in progress: the VM, what pyvmm refused, what the steps noted, the last outcome."""

    def __init__(self, scenario: Scenario, vm: Vm, stack: contextlib.ExitStack, workspace: Workspace):
        self.scenario = scenario
        self.vm = vm
        self.workspace = workspace
        self._stack = stack  # closes what is made here (backings registered behind pyvmm's back)
        self.observation = Observation(Answer())
        self.outcome: Outcome | None = None

    def refused(self, what: str) -> None:
        self.observation.refusals.append(what)

    def note(self, what: str) -> None:
        self.observation.notes.append(what)

    def region(self, index: int) -> MemoryRegion:
        """The memslot made from ``scenario.slots[index]``."""
        gpa = self.vm.arch.ram_base + self.scenario.slots[index].offset
        region = self.vm.memory.find(gpa)
        if region is None:
            raise ConfigError(f"scenario {self.scenario.name}: no memslot at {gpa:#x} (slot {index})")
        return region

    def kernel_call(self, call: str, do) -> Answer:
        """``do()`` makes system call ``call`` directly; its answer."""
        try:
            do()
        except KvmError as err:
            return self.failed(err.call, err.errno)
        except OSError as err:
            return self.failed(call, err.errno)
        return Answer(call=call)

    def failed(self, call: str, err: int) -> Answer:
        """The kernel's answer: ``call`` failed with errno ``err``."""
        self.observation.errno_meaning = os.strerror(err)
        return Answer(call=call, errno=errno_mod.errorcode.get(err, f"E{err}"))

    # --- the ordinary parts ---------------------------------------------------------------------
    def add_slot(self, slot: Slot) -> Answer | None:
        """Register one memslot through pyvmm; where pyvmm's rules refuse it, say so and ask the kernel."""
        vm = self.vm
        spec = BackingSpec.parse(self.workspace.resolve(slot.backing))
        gpa = vm.arch.ram_base + slot.offset
        try:
            vm.memory.validate(gpa, slot.size, int(slot.flags), spec.alignment)
        except ConfigError as err:
            self.refused(str(err))
            return self._add_slot_directly(spec, gpa, slot)
        try:
            vm.add_memory(slot.size, spec, gpa=gpa, flags=int(slot.flags))
        except KvmError as err:
            return self.failed(err.call, err.errno)
        return None

    def _add_slot_directly(self, spec: BackingSpec, gpa: int, slot: Slot) -> Answer:
        backing = self._stack.enter_context(spec.create(slot.size, self.vm.fd))
        used = {r.slot for r in self.vm.memory.regions}
        number = next(i for i in range(len(used) + 1) if i not in used)
        flags = int(slot.flags) | backing.slot_flags
        if backing.guest_memfd is not None:
            return self.kernel_call("KVM_SET_USER_MEMORY_REGION2", lambda: self.vm.fd.set_user_memory_region2(
                number, flags, gpa, slot.size, backing.hva, guest_memfd=backing.guest_memfd,
                guest_memfd_offset=backing.guest_memfd_offset))
        return self.kernel_call("KVM_SET_USER_MEMORY_REGION", lambda: self.vm.fd.set_user_memory_region(
            number, flags, gpa, slot.size, backing.hva))

    def run(self) -> Answer:
        """KVM_RUN until the guest ends; pyvmm's pre-check (arch.check_before_run) refusing is recorded and
        the run made without it."""
        vm = self.vm
        precheck = True
        try:
            vm.arch.check_before_run(vm)
        except ConfigError as err:
            self.refused(str(err))
            precheck = False
        outcome = vm.run(timeout=self.scenario.timeout, precheck=precheck)
        self.outcome = outcome
        obs, report = self.observation, outcome.report
        obs.outcome = f"{outcome.kind.value}: {outcome.detail}"
        obs.console = vm.console.text().splitlines()[-CONSOLE_LINES:]
        if report is None:
            return Answer(outcome=outcome.kind, status=outcome.status, rom_writes=vm.memory.rom_writes_dropped)
        obs.errno_meaning, obs.likely_cause, obs.report = report.errno_meaning, report.likely_cause, report.to_dict()
        return Answer(outcome=outcome.kind, call=report.call, errno=report.errno_name, exit_reason=report.exit_reason,
                      status=outcome.status, slot=report.faulting_slot, rom_writes=vm.memory.rom_writes_dropped)

    def steps(self, when: When) -> Answer | None:
        for step in self.scenario.steps:
            if step.when is when:
                answer = step.apply(self)
                if answer is not None:
                    return answer
        return None

    def play(self) -> Answer:
        for slot in self.scenario.slots:
            answer = self.add_slot(slot)
            if answer is not None:
                return answer
        answer = self.steps(When.BEFORE_BOOT)
        if answer is not None or self.scenario.guest is None:
            return answer or Answer()
        vm = self.vm
        vm.create_vcpus(self.scenario.vcpus)
        vm.boot(firmware_path(vm.arch.name, self.scenario.guest.name))
        answer = self.steps(When.BEFORE_RUN) or self.run()
        return self.steps(When.AFTER_RUN) or answer


def observe(scenario: Scenario, kvm: Kvm) -> Observation:
    """Run ``scenario`` in this process on ``kvm``; raises MissingFeature for what the host lacks."""
    # closed in reverse: the VM, then ``stack`` (backings registered behind pyvmm's back), the files last
    with Workspace() as workspace, contextlib.ExitStack() as stack, Vm(protected=scenario.protected, kvm=kvm) as vm:
        ctx = RunContext(scenario, vm, stack, workspace)
        ctx.observation.answer = ctx.play()
        return ctx.observation


def observe_confined(scenario: Scenario, kvm_path: str) -> Observation:
    """Run ``scenario`` in a child process under its ``Confinement`` (``pyvmm/scenarios/child.py``)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    runs = 1 + sum(step.when is When.AFTER_RUN for step in scenario.steps)
    limit = runs * scenario.timeout + CHILD_TIMEOUT_MARGIN
    try:
        res = subprocess.run([sys.executable, "-m", "pyvmm.scenarios.child", kvm_path], input=pickle.dumps(scenario),
                             capture_output=True, env=env, cwd=root, timeout=limit)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        raise ConfigError(f"scenario {scenario.name}: the confined child process did not finish in {limit:.0f} s") from None
    try:
        reply = json.loads(res.stdout.decode())
    except ValueError:
        raise ConfigError(f"scenario {scenario.name}: the confined child process failed (status {res.returncode}): "
                          + (res.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]) from None
    if reply.get("skipped"):
        raise MissingFeature(reply["skipped"])
    if reply.get("error"):
        raise ConfigError(f"scenario {scenario.name} (confined child process): {reply['error']}")
    return Observation.from_dict(reply["observation"])


def run_scenario(scenario: Scenario, facts: HostFacts) -> Result:
    """Run ``scenario`` for real (or skip it, saying what this host lacks) and compare."""
    why = facts.why_not(scenario)
    if why:
        return Result(scenario, Verdict.SKIPPED, skipped=why)
    try:
        if scenario.confinement is not None:
            observation = observe_confined(scenario, facts.kvm_path)
        else:
            with Kvm(facts.kvm_path) as kvm:
                observation = observe(scenario, kvm)
    except MissingFeature as err:
        return Result(scenario, Verdict.SKIPPED, skipped=str(err))
    except PyvmmError as err:  # one broken scenario must not stop --all: it is a mismatch, with the reason
        return Result(scenario, Verdict.MISMATCH, error=f"{type(err).__name__}: {err}")
    matched = scenario.expected.match(observation.answer, bool(observation.refusals))
    return Result(scenario, Verdict.MATCH if matched else Verdict.MISMATCH, observation, matched=matched)
