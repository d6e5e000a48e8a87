"""CPU energy from RAPL package counters in sysfs (powercap), with wraparound handling."""

from __future__ import annotations

import re
import time
from pathlib import Path

from efficiency.measure.sample import (
    _SHORT_WINDOW_EFFECT,
    MAX_CPU_PACKAGE_POWER_W,
    POWERCAP_ROOT,
    RAPL_COUNT_RESOLUTION_J,
    RAPL_UPDATE_PERIOD_S,
    Clock,
    EnergySample,
    Meter,
    NullMeter,
    _short_window_caveat,
    _Window,
    counter_uncertainty_j,
    implausible_power,
    zero_energy_reason,
)

# Top-level RAPL zones only: `intel-rapl:0:0` is a sub-zone of package 0 and `intel-rapl-mmio:0` repeats it.
_TOP_LEVEL_ZONE = re.compile(r"intel-rapl:(\d+)")

def _package_zones(root: Path) -> list[Path]:
    """Top-level `intel-rapl:N` zones whose name starts with "package", by N. Never psys or sub-zones."""
    if not root.is_dir():
        return []
    zones = []
    for path in root.iterdir():
        match = _TOP_LEVEL_ZONE.fullmatch(path.name)
        if match is None:
            continue
        try:
            name = (path / "name").read_text().strip()
        except OSError:
            continue
        if name.startswith("package"):
            zones.append((int(match.group(1)), path))
    return [path for _, path in sorted(zones)]


def _read_uj(path: Path) -> int:
    return int(path.read_text().strip())


class RaplMeter:
    """Sums RAPL package zones (`intel-rapl:N/energy_uj`, µJ) under the powercap root.

    Wraparound: when a zone's end reading is below its begin reading, `max_energy_range_uj` is added. A
    window longer than one full wrap period (range / package power, typically tens of minutes) cannot be
    detected and reads short. A counter reset (stop < start without a real wrap) reads as nearly a whole
    range: refused by the plausibility bound `MAX_CPU_PACKAGE_POWER_W` per package, as is 0 J over a window
    of at least one update period. Uncertainty: one count (`RAPL_COUNT_RESOLUTION_J`) per edge per zone plus
    :func:`efficiency.measure.sample.counter_uncertainty_j` (one update period of mean power per edge).
    """

    def __init__(self, root: Path = POWERCAP_ROOT, *, clock: Clock = time.perf_counter) -> None:
        self.root = root
        self.method = "rapl"
        self._zones = _package_zones(root)
        self.domains = tuple(zone.name for zone in self._zones)
        self._window = _Window(clock)
        self._start_uj: list[int] = []
        self._range_uj: list[int] = []

    @staticmethod
    def available(root: Path = POWERCAP_ROOT) -> tuple[bool, str]:
        """(True, zones) when every package zone's counter is readable, else (False, why not)."""
        if not root.is_dir():
            return False, f"no powercap directory {root} (RAPL absent: VM, container or not Linux)"
        zones = _package_zones(root)
        if not zones:
            return False, f"no RAPL package zones under {root} (intel-rapl:N with a name package-*)"
        for zone in zones:
            for path in (zone / "energy_uj", zone / "max_energy_range_uj"):
                try:
                    _read_uj(path)
                except PermissionError:
                    return False, (
                        f"permission denied reading {path}: since the 2020 PLATYPUS fix (CVE-2020-8694) "
                        "RAPL energy counters are readable by root only"
                    )
                except (OSError, ValueError) as exc:
                    return False, f"cannot read {path}: {exc}"
        return True, "RAPL package zones: " + ", ".join(zone.name for zone in zones)

    def begin(self) -> None:
        if not self._zones:
            raise RuntimeError(self.available(self.root)[1])
        self._range_uj = [_read_uj(zone / "max_energy_range_uj") for zone in self._zones]
        self._window.open()
        try:
            self._start_uj = [_read_uj(zone / "energy_uj") for zone in self._zones]
        except BaseException:
            self._window.drop()
            raise

    def end(self) -> EnergySample:
        t0, t1 = self._window.close()
        window_s = t1 - t0
        try:
            end_uj = [_read_uj(zone / "energy_uj") for zone in self._zones]
        except (OSError, ValueError) as exc:
            return EnergySample(None, window_s, self.method, None, self.domains, f"RAPL read failed: {exc}")
        total_uj = 0
        for start, stop, range_uj in zip(self._start_uj, end_uj, self._range_uj, strict=True):
            total_uj += stop - start if stop >= start else stop - start + range_uj
        energy_j = total_uj / 1e6
        refused = implausible_power(energy_j, window_s, RAPL_UPDATE_PERIOD_S, MAX_CPU_PACKAGE_POWER_W,
                                    len(self._zones))
        if energy_j == 0:
            refused = zero_energy_reason("RAPL package counter", window_s, RAPL_UPDATE_PERIOD_S)
        if refused:
            return EnergySample(None, window_s, self.method, None, self.domains, refused)
        caveat = _short_window_caveat(window_s, RAPL_UPDATE_PERIOD_S, "RAPL counter", _SHORT_WINDOW_EFFECT)
        uncertainty_j = None
        if caveat is None:
            resolution_j = 2 * RAPL_COUNT_RESOLUTION_J * len(self._zones)
            uncertainty_j = resolution_j + counter_uncertainty_j(energy_j, window_s, RAPL_UPDATE_PERIOD_S)
        return EnergySample(energy_j, window_s, self.method, uncertainty_j, self.domains, caveat)

    def cancel(self) -> None:
        self._window.drop()


def select_cpu_meter(root: Path = POWERCAP_ROOT) -> Meter:
    """RaplMeter when the package counters are readable, else a NullMeter saying why not."""
    ok, why = RaplMeter.available(root)
    return RaplMeter(root) if ok else NullMeter(why)
