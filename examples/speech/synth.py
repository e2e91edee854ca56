"""Speech synthesis with espeak-ng, through ctypes, from the `espeakng-loader` wheel (library + voice data).

espeak-ng keeps state between utterances (pitch flutter phase, wave generator phase), so the same text
said twice in one process comes out a few samples different. Determinism here comes from synthesising each
utterance in a child forked from a process that has only initialised the library: every child starts
from the same memory, seeds the library's noise generator, and says one thing. The library is not
re-entrant, so parallelism is a pool of processes (`synthesize_many`), never threads.

This module needs only numpy and the standard library: pool workers start fast and hold no torch threads.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # the library's default on a data error is exit(); we want an error code
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_PARAM_RANGE = 4

RATE_MIN, RATE_NORMAL, RATE_MAX = 80, 175, 450  # words per minute, the library's limits
PITCH_NORMAL = 50  # 0..100

# Variants whose names the library cannot take after "+" (spaces) or that are not speech-like enough.
_EXCLUDED_VARIANTS = {"Mr serious"}
# en-Shaw reads the Shavian alphabet, not Latin text.
_EXCLUDED_ACCENTS = {"en-Shaw"}


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # (priority byte, NUL-terminated string) pairs; read by hand
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Engine:
    """The library, initialised once per process; never synthesises in this process (see the module doc)."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        self.lib.espeak_Info.restype = ctypes.c_char_p
        data = espeakng_loader.get_data_path().encode()
        rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate}) with data at {data.decode()}")
        self.sample_rate = rate
        self.version = self.lib.espeak_Info(None).decode()
        self.chunks: list[bytes] = []
        self._callback = _SynthCallback(self._collect)  # kept referenced: the library holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        # Loading the English voice and dictionary here (the same in every process) leaves each child only
        # its variant to read: about a third of the per-utterance cost.
        self.lib.espeak_SetVoiceByName(b"en")
        self.pid = os.getpid()

    def _collect(self, wav, num_samples, events) -> int:
        if wav and num_samples > 0:
            self.chunks.append(ctypes.string_at(wav, 2 * num_samples))
        return 0  # 0: go on

    def list(self, spec: _Voice | None) -> list[_Voice]:
        table = self.lib.espeak_ListVoices(ctypes.byref(spec) if spec is not None else None)
        out = []
        i = 0
        while table[i]:
            out.append(table[i].contents)
            i += 1
        return out

    def say_here(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> bytes:
        """Synthesises in this process (changes its state): only ever called in a forked child."""
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        self.chunks = []
        data = text.encode()
        err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err}) for {text!r}")
        return b"".join(self.chunks)


_engine: _Engine | None = None
synth_calls = 0  # utterances synthesised by this process (its children count here); tests read it


def _get_engine() -> _Engine:
    global _engine
    if _engine is None or _engine.pid != os.getpid():
        _engine = _Engine()
    return _engine


def sample_rate() -> int:
    """The library's output rate in Hz (22050 for espeak-ng)."""
    return _get_engine().sample_rate


def library_version() -> str:
    return _get_engine().version


@dataclass(frozen=True, order=True)
class Voice:
    """One speaker: an English accent (a voice file, e.g. "en-US") and a variant (e.g. "m3", "" = none)."""

    accent: str
    variant: str = ""

    @property
    def name(self) -> str:
        """The name espeak_SetVoiceByName takes: "en-US+m3"."""
        return f"{self.accent}+{self.variant}" if self.variant else self.accent


def list_accents(language: str = "en") -> list[str]:
    """Voice files of one language (e.g. "en-US", "en-GB-scotland"), from espeak_ListVoices, sorted."""
    accents = []
    for v in _get_engine().list(None):
        file = v.identifier.decode().rsplit("/", 1)[-1]
        if (file == language or file.startswith(language + "-")) and file not in _EXCLUDED_ACCENTS:
            accents.append(file)
    return sorted(set(accents))


def list_variants() -> list[str]:
    """Voice variants (files under voices/!v: "m3", "f2", "klatt", ...), sorted."""
    spec = _Voice()
    spec.languages = ctypes.cast(ctypes.c_char_p(b"variant"), ctypes.c_void_p)
    names = []
    for v in _get_engine().list(spec):
        file = v.identifier.decode().rsplit("/", 1)[-1]
        if file not in _EXCLUDED_VARIANTS and " " not in file:
            names.append(file)
    return sorted(set(names))


@dataclass(frozen=True)
class SynthRequest:
    """One utterance to say. rate: words per minute (80..450); pitch: 0..100; seed: the library's noise."""

    text: str
    voice: Voice
    rate: int = RATE_NORMAL
    pitch: int = PITCH_NORMAL
    seed: int = 0


def _read_all(fd: int) -> bytes:
    parts = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


def synthesize(request: SynthRequest) -> np.ndarray:
    """Says request.text; returns float32 mono in [-1, 1) at `sample_rate()` Hz, shape [num_samples].

    Deterministic: the same request gives the same samples in any process, in any order of calls.
    """
    global synth_calls
    engine = _get_engine()
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns on fork in a threaded process; the child runs only the C library and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: say it, send status + samples, leave without running any Python cleanup
        os.close(read_fd)
        status = 1
        try:
            try:
                pcm = engine.say_here(request.text, request.voice.name, request.rate, request.pitch, request.seed)
                payload = struct.pack("<B", 0) + pcm
            except Exception as exc:  # reported by the parent
                payload = struct.pack("<B", 1) + repr(exc).encode()
            view = memoryview(payload)
            while view:
                view = view[os.write(write_fd, view) :]
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    try:
        payload = _read_all(read_fd)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    synth_calls += 1
    if not payload:
        raise RuntimeError(f"espeak-ng child died saying {request.text!r} with {request.voice.name}")
    if payload[0] != 0:
        raise RuntimeError(f"espeak-ng failed on {request.text!r} ({request.voice.name}): {payload[1:].decode()}")
    return np.frombuffer(payload[1:], dtype="<i2").astype(np.float32) / 32768.0


def _serve() -> None:
    """A pool worker's loop: length-prefixed pickled request batches in on stdin, results out on stdout."""
    requests_in = os.fdopen(os.dup(0), "rb")
    results_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the library or Python prints goes to stderr, not into the result stream
    while True:
        header = requests_in.read(8)
        if len(header) < 8:
            return
        batch = pickle.loads(requests_in.read(struct.unpack("<Q", header)[0]))
        try:
            result = ("ok", [synthesize(r) for r in batch])
        except Exception as exc:  # sent to the parent, which raises it
            result = ("error", repr(exc))
        data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        results_out.write(struct.pack("<Q", len(data)) + data)
        results_out.flush()


def _run_worker(proc: subprocess.Popen, batches: list[list[SynthRequest]], todo: queue.Queue, results: dict) -> None:
    while True:
        try:
            index = todo.get_nowait()
        except queue.Empty:
            return
        data = pickle.dumps(batches[index], protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.write(struct.pack("<Q", len(data)) + data)
        proc.stdin.flush()
        header = proc.stdout.read(8)
        if len(header) < 8:
            results[index] = ("error", f"synthesis worker exited with {proc.wait()}")
            return
        results[index] = pickle.loads(proc.stdout.read(struct.unpack("<Q", header)[0]))


def synthesize_many(requests: list[SynthRequest], workers: int | None = None) -> list[np.ndarray]:
    """`synthesize` over a list, in `workers` processes (default: the CPU count), results in order.

    Workers are fresh interpreters that import only this module (no torch, no caller's __main__), and every
    utterance still comes from a fresh fork of an initialised library: results do not depend on `workers`.
    """
    global synth_calls
    if workers is None:
        workers = os.cpu_count() or 1
    if workers <= 1 or len(requests) < 16:
        return [synthesize(r) for r in requests]
    # Batches of a few dozen: one round trip per batch, enough batches to keep every worker busy.
    size = max(1, min(64, len(requests) // (4 * workers)))
    batches = [requests[i : i + size] for i in range(0, len(requests), size)]
    todo: queue.Queue = queue.Queue()
    for i in range(len(batches)):
        todo.put(i)
    root = str(Path(__file__).resolve().parents[2])  # the directory that holds the `examples` package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, "-c", "from examples.speech.synth import _serve; _serve()"]
    procs = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        for _ in range(min(workers, len(batches)))
    ]
    results: dict[int, tuple[str, object]] = {}
    threads = [threading.Thread(target=_run_worker, args=(p, batches, todo, results)) for p in procs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait()
    out: list[np.ndarray] = []
    for i in range(len(batches)):
        status, value = results.get(i, ("error", "batch not run"))
        if status != "ok":
            raise RuntimeError(f"synthesis failed: {value}")
        out.extend(value)
    synth_calls += len(requests)
    return out
