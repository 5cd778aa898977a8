"""A private PulseAudio server with a null sink, for testing the real capture path without hardware.

The recipe of docs/conventions.md ("Testing the audio stack"), isolated so that it neither needs
nor disturbs a user's or another test run's server: the daemon runs in the foreground as our child (so we hold its pid and end exactly it),
its runtime/state paths and socket live in a temporary directory, and this process reaches it
through PULSE_SERVER. The null sink's monitor becomes the default source, so PortAudio's ALSA
"default" input (ALSA's pulse plugin, from libasound2-plugins, a dependency of pulseaudio)
records whatever ``play()`` sends to the sink.

Needs the system packages pulseaudio, pulseaudio-utils (pactl, paplay) and libportaudio2, and the
Python package sounddevice; ``pulse_server()`` raises ``PulseUnavailable`` (with the reason) when
any is missing or the daemon does not come up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

SINK = "rtsed_test_sink"
PACKAGES = "apt-get install pulseaudio pulseaudio-utils libportaudio2; pip install sounddevice"


class PulseUnavailable(RuntimeError):
    pass


class PulseServer:
    def __init__(self, root: Path, env: dict[str, str], proc: subprocess.Popen):
        self.root = root
        self.env = env
        self.proc = proc
        self.sink = SINK

    def pactl(self, *args: str) -> str:
        return subprocess.run(["pactl", *args], env=self.env, check=True, capture_output=True,
                              text=True, timeout=10).stdout

    def play(self, path: str | Path) -> subprocess.Popen:
        """Start playing a sound file into the null sink (returns the paplay process)."""
        return subprocess.Popen(["paplay", f"--device={self.sink}", str(path)], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def log(self) -> str:
        try:
            return (self.root / "pulseaudio.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def _reinit_portaudio(sd) -> None:
    """PortAudio lists devices once, at initialisation: re-list after the server changes."""
    sd._terminate()
    sd._initialize()


@contextlib.contextmanager
def pulse_server(root: Path) -> Iterator[PulseServer]:
    """Run a private PulseAudio server (null sink SINK, its monitor the default source) while the
    block runs; this process's PULSE_SERVER points at it meanwhile."""
    missing = [b for b in ("pulseaudio", "pactl", "paplay") if shutil.which(b) is None]
    if missing:
        raise PulseUnavailable(f"{', '.join(missing)} not installed ({PACKAGES})")
    try:
        import sounddevice as sd
    except ImportError:
        raise PulseUnavailable(f"sounddevice not installed ({PACKAGES})") from None
    except OSError as exc:
        raise PulseUnavailable(f"PortAudio missing: {exc} ({PACKAGES})") from None

    root.mkdir(parents=True, exist_ok=True)
    socket = root / "native"
    env = dict(os.environ)
    env.update({
        "PULSE_SERVER": f"unix:{socket}",
        "PULSE_RUNTIME_PATH": str(root / "run"),
        "PULSE_STATE_PATH": str(root / "state"),
        "PULSE_COOKIE": str(root / "cookie"),
        "XDG_RUNTIME_DIR": str(root),
        "HOME": str(root),
    })
    log = open(root / "pulseaudio.log", "wb")
    proc = subprocess.Popen(
        ["pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "-n", "--use-pid-file=no",
         "--disable-shm=yes", "--realtime=no", "--high-priority=no", "--log-target=stderr",
         f"--load=module-null-sink sink_name={SINK}",
         f"--load=module-native-protocol-unix socket={socket} auth-anonymous=1"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    server = PulseServer(root, env, proc)
    saved = {k: os.environ.get(k) for k in ("PULSE_SERVER", "PULSE_COOKIE")}
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise PulseUnavailable(f"pulseaudio exited with {proc.returncode}: {server.log()}")
            try:
                server.pactl("info")
                break
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise PulseUnavailable(f"pulseaudio did not answer within 10 s: {server.log()}") from None
                time.sleep(0.1)
        server.pactl("set-default-source", f"{SINK}.monitor")
        os.environ["PULSE_SERVER"] = env["PULSE_SERVER"]
        os.environ["PULSE_COOKIE"] = env["PULSE_COOKIE"]
        _reinit_portaudio(sd)
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        with contextlib.suppress(Exception):
            _reinit_portaudio(sd)
