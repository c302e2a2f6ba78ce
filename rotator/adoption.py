"""Taking over from an earlier daemon of the same state_dir, at startup: read its state
file, adopt the instances it left running, stop whatever else it left behind.

An instance is adopted only when the process the state file names still runs (pid and
create time), runs as our user and carries the marker recorded for it, answers its
health check, and (on a port) alone listens there. Everything else that carries this
state_dir's marker is stopped: draining or unhealthy instances, removed components,
instances the state file never learnt of; and, on Linux, what is left in the cgroups
of instances nobody adopted. A process the state file names but that disproves the
claim (another user's, no marker) is left alone: it is not ours to stop.

The daemon calls `EarlierRun` once, before it starts the components that were not
adopted; what to start is then the daemon's business.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

from rotator import cgroups
from rotator.component import Component
from rotator.config import Endpoint
from rotator.health import NotHealthy
from rotator.instance import KILL_GRACE, Instance, NotOurs, marked_processes
from rotator.state import InstanceRecord, State, StateError, StateFile, StateTooNew

# An instance found from an earlier run must answer its health check within this to be adopted.
ADOPT_CHECK_TIMEOUT = 3.0


class EarlierRun:
    """What an earlier daemon of this state_dir left: its state file and its processes."""

    def __init__(
        self,
        state_file: StateFile,
        scope: str,
        components: Mapping[str, Component],
        out: Callable[[str], None],
        cgroup_parent: Path | None = None,
    ) -> None:
        self.state_file = state_file
        self.scope = scope  # this state_dir's prefix of every instance marker
        self.components = components
        self.out = out
        self.cgroup_parent = cgroup_parent

    def load(self) -> State:
        """The state file (empty when it cannot be trusted; StateTooNew is raised), with
        each component's recorded definition restored."""
        try:
            state = self.state_file.load()
        except StateTooNew:
            raise
        except StateError as exc:
            self.out(f"rotator: {exc}")
            state = State(components={})
        for name, record in state.components.items():
            comp = self.components.get(name)
            if comp is not None and (problem := comp.restore(record)) is not None:
                self.out(f"{name}: {problem}")
        return state

    async def adopt(self, state: State) -> set[str]:
        """Adopt each recorded instance of the balancing set that still runs and is
        healthy; the markers of the adopted ones."""
        kept: set[str] = set()
        for name, record in state.components.items():
            comp = self.components.get(name)
            if record.canary:  # never adopted: its leftovers are stopped by their marker
                pids = ", ".join(str(r.pid) for r in record.canary)
                self.out(
                    f"{name}: a canary (pid {pids}) was on trial when the earlier daemon died;"
                    " it is rolled back and stopped, the stable definition serves"
                )
            if comp is None or record.stopped:
                continue
            for r in record.instances:
                if await self._adopt_one(comp, r):
                    kept.add(r.marker)
        return kept

    async def _adopt_one(self, comp: Component, r: InstanceRecord) -> bool:
        name = comp.name
        endpoint = Endpoint(comp.host, r.port or 0, r.socket)
        if (problem := comp.adoptable(r.replica)) is not None:
            self.out(f"{name}: not adopting pid {r.pid}: {problem}")
            return False
        try:
            if not r.marker.startswith(f"{self.scope}:{name}:"):
                raise NotOurs("its marker is not one of this state_dir's (a copied state_dir?)")
            inst = Instance.adopt(
                name, endpoint, r.pid, r.create_time, r.marker, r.started, comp.log_dir, r.replica
            )
        except NotOurs as exc:  # a claim of the state file that the process disproves
            self.out(f"{name}: not adopting pid {r.pid}: {exc}; leaving it alone")
            return False
        if inst is None:
            self.out(f"{name}: pid {r.pid} of the earlier run is gone")
            return False
        problem = await _adoptable(comp, inst)
        if problem is not None:
            self.out(f"{name}: not adopting pid {r.pid}: {problem}")
            return False
        comp.adopt(inst)
        return True

    async def stop_leftovers(self, kept: set[str]) -> None:
        """Stop every process an earlier daemon of this state_dir started and nobody
        adopted (`kept`: the markers of those adopted). The marker proves they are ours."""
        for marker, procs in marked_processes(f"{self.scope}:").items():
            if marker in kept:
                continue
            name = marker.split(":")[1]
            comp = self.components.get(name)
            spec = comp.spec if comp is not None else None
            root = min(procs, key=lambda p: p.create_time())
            # Only stopped: its log is not read, its port not asked.
            inst = Instance(
                name, Endpoint(""), root.pid, marker, None, 0, create_time=root.create_time()
            )
            result = await inst.stop(
                spec.stop_signal if spec else signal.SIGTERM, spec.stop_timeout if spec else 10.0
            )
            why = "of a removed component" if comp is None else "left from the earlier run"
            self.out(f"{name}: stopped pid {root.pid} {why} ({result.outcome})")
        if self.cgroup_parent is not None:
            await self._stop_leftover_cgroups(self.cgroup_parent, kept)

    async def _stop_leftover_cgroups(self, parent: Path, kept: set[str]) -> None:
        """What is left in the cgroups of this state_dir's instances that nobody adopted
        (an instance whose root died while no daemon ran leaves its escapees there, with
        no marker to find them by) is killed, and the cgroups removed."""
        keep = {cgroups.name_of(marker) for marker in kept}
        for cgroup in parent.glob(cgroups.name_of(f"{self.scope}:*")):
            if cgroup.name in keep:
                continue
            if pids := cgroups.members(cgroup):
                cgroups.kill(cgroup)
                self.out(f"rotator: killed {pids} left in {cgroup.name} from the earlier run")
                for _ in range(int(KILL_GRACE / 0.05)):
                    if not cgroups.members(cgroup):
                        break
                    await asyncio.sleep(0.05)
            cgroups.remove(cgroup)


async def _adoptable(comp: Component, inst: Instance) -> str | None:
    """None when `inst` passes the gate a new instance passes (a healthy answer, here
    within ADOPT_CHECK_TIMEOUT) and, on a port, listens there alone; else why not."""
    try:
        await comp.health.wait_until_healthy(
            inst.endpoint,
            inst.wait(),
            definition=comp.spec,
            timeout=ADOPT_CHECK_TIMEOUT,
            replica=inst.replica,
        )
    except NotHealthy as exc:
        return str(exc)
    return None if inst.endpoint.path else await inst.port_problem()
