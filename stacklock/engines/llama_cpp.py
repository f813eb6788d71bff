"""The llama.cpp engine, in process, through llama-cpp-python (the ``llama`` extra).

Generation runs its own loop over the low-level API instead of ``Llama.create_completion``: that path computes
a full-vocabulary log-softmax and sorts it on every step when logprobs are asked for (about 25 s for 32 tokens
of Gemma 3 270M, against under 1 s for the plain loop). Here the top-k alternatives come from the logits of
the last position only, with one ``argpartition`` and one log-sum-exp per step, and the token itself is drawn
by llama.cpp's own sampler chain, built the way ``Llama.generate`` builds it, so the tokens equal what
llama-cpp-python would produce with the same settings.

Every prompt starts from an empty KV cache: llama-cpp-python's prefix reuse and prompt cache are never used,
so a smoke prompt's result does not depend on the prompt that ran before it.

The adapter decides no policy: unseeded sampling and prompts that may overflow the context are findings of
``stacklock lock`` (:mod:`stacklock.rules.policy`). What remains here is the last line behind them: a prompt
whose real token count overflows the context is an :class:`EngineError` instead of llama.cpp's crash, and a
sampler value the lock gives as unknown is refused, since llama.cpp's sampler chain needs every value.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, cast

from stacklock.engines.base import (
    AdapterInfo,
    BackendSettings,
    Capabilities,
    EngineIdentity,
    Generation,
    SamplerSettings,
    StepLogprobs,
    StopReason,
    first_stop,
)
from stacklock.engines.machine import read_cpu_name
from stacklock.errors import EngineError, InputError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import numpy as np
    import numpy.typing as npt

__all__ = ["ENGINE_NAME", "INSTALL_HINT", "EngineLog", "LlamaCppEngine", "LlamaCppModel", "top_logprobs"]

ENGINE_NAME = "llama-cpp-python"
INSTALL_HINT = (
    "install it with pip install 'stacklock[llama]' (it builds llama.cpp from source, about 10 minutes)"
)

# llama.cpp's "pick a random seed" sentinel: a sampler seeded with it cannot be reproduced.
RANDOM_SEED = 0xFFFFFFFF

# ggml_backend_dev_type values, from ggml-backend.h.
_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


# ggml_log_level values, from ggml.h (llama-cpp-python's own logger still maps the older numbering, so it
# prints every warning whatever ``verbose`` says).
_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5


class EngineLog:
    """llama.cpp's log, kept instead of printed: the last lines, for error messages.

    llama.cpp writes its progress and warnings to stderr (``n_ctx_seq (512) > n_ctx_train (256)``, ``using
    full-size SWA cache``...), which would interleave with stacklock's one-line output. The lines are kept in a
    ring buffer instead, and an error raised by the adapter quotes the warnings and errors among them.
    """

    def __init__(self, size: int = 200) -> None:
        self.lines: deque[tuple[int, str]] = deque(maxlen=size)
        self._partial = ""
        self._level = 0
        # ctypes must keep the callback object alive as long as llama.cpp may call it: for the process.
        self.callback: Any = None

    def write(self, level: int, text: str) -> None:
        """One call of llama.cpp's log callback: a line, a fragment of one, or a continuation."""
        if level != _LOG_CONT:
            self._level = level
        self._partial += text
        *complete, self._partial = self._partial.split("\n")
        self.lines.extend((self._level, line.rstrip()) for line in complete if line.strip())

    def clear(self) -> None:
        """Forget the lines so far, so that a message quotes only what followed."""
        self.lines.clear()
        self._partial = ""

    def problems(self, limit: int = 3) -> tuple[str, ...]:
        """The last warnings and errors llama.cpp logged, most recent last."""
        found = [line for level, line in self.lines if level in {_LOG_WARN, _LOG_ERROR}]
        errors = [line for level, line in self.lines if level == _LOG_ERROR]
        return tuple((errors or found)[-limit:])

    def quote(self) -> str:
        """The problems as a suffix for a one-line error message, or nothing."""
        said = " | ".join(self.problems())
        return f" (llama.cpp: {said})" if said else ""


ENGINE_LOG = EngineLog()


def _install_log(llama_cpp: Any) -> None:
    if ENGINE_LOG.callback is not None:
        return

    def on_log(level: int, text: bytes | None, _user_data: Any) -> None:
        ENGINE_LOG.write(int(level), (text or b"").decode("utf-8", "replace"))

    ENGINE_LOG.callback = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(ENGINE_LOG.callback, ctypes.c_void_p(0))


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp  # noqa: PLC0415 - the engine is an optional extra, imported only when asked for.
    except ImportError as exc:
        raise EngineError(f"the {ENGINE_NAME} engine is not installed ({exc})", hint=INSTALL_HINT) from exc
    _install_log(llama_cpp)
    return llama_cpp


def _ggml_library(llama_cpp: Any, name: str) -> ctypes.CDLL | None:
    """A ggml shared library llama-cpp-python already loaded, for what its bindings do not expose."""
    path = Path(llama_cpp.__file__).parent / "lib" / f"lib{name}{_shared_suffix()}"
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None


def _shared_suffix() -> str:
    if sys.platform == "win32":
        return ".dll"
    if sys.platform == "darwin":
        return ".dylib"
    return ".so"


def _c_string(library: ctypes.CDLL | None, function: str) -> str | None:
    if library is None or not hasattr(library, function):
        return None
    func = getattr(library, function)
    func.restype = ctypes.c_char_p
    func.argtypes = []
    value = func()
    return value.decode("utf-8", "replace") if value else None


def _devices(llama_cpp: Any) -> list[tuple[str, str, str]]:
    """Every ggml device as (backend registry name, device type, 'name: description')."""
    ggml = _ggml_library(llama_cpp, "ggml")
    if ggml is None or not hasattr(ggml, "ggml_backend_dev_count"):
        return []
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for function in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(ggml, function).restype = ctypes.c_char_p
        getattr(ggml, function).argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_name.restype = ctypes.c_char_p
    ggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    found = []
    for index in range(ggml.ggml_backend_dev_count()):
        device = ggml.ggml_backend_dev_get(index)
        name = (ggml.ggml_backend_dev_name(device) or b"?").decode("utf-8", "replace")
        description = (ggml.ggml_backend_dev_description(device) or b"").decode("utf-8", "replace").strip()
        registry = (ggml.ggml_backend_reg_name(ggml.ggml_backend_dev_backend_reg(device)) or b"?").decode()
        kind = _DEVICE_TYPES.get(ggml.ggml_backend_dev_type(device), "unknown")
        found.append((registry.lower(), kind, f"{name}: {description}" if description else name))
    return found


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python; registered as the ``llama-cpp-python`` engine."""

    name = ENGINE_NAME
    # Defaults read from llama-cpp-python 0.3.x: ``Llama.__init__`` and ``Llama.create_completion`` keywords.
    info: ClassVar[AdapterInfo] = AdapterInfo(
        name=ENGINE_NAME,
        distribution="llama-cpp-python",
        build_scheme="vendored",
        sampler_defaults={
            "temperature": 0.8,
            "top_k": 40,
            "top_p": 0.95,
            "min_p": 0.05,
            "typical_p": 1.0,
            "repeat_penalty": 1.0,
            "repeat_last_n": 64,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "mirostat": 0,
            "mirostat_tau": 5.0,
            "mirostat_eta": 0.1,
            "seed": RANDOM_SEED,
            "max_tokens": 16,
            "stop": (),
        },
        backend_defaults={
            "gpu_layers": 0,
            "flash_attention": "off",
            "cache_type_k": "f16",
            "cache_type_v": "f16",
            "threads": "auto",
            "batch_size": 512,
            "context_size": 512,
        },
        capabilities=Capabilities(
            tokenize=True,
            detokenize=True,
            token_id_prompts=True,
            top_logprobs=True,
            chat_render=True,
            served=False,
        ),
        # The version pyproject.toml's `llama` extra pins, which stacklock's own tests run.
        tested_version="0.3.36",
    )

    def __init__(self) -> None:
        self._llama_cpp = _import_llama_cpp()

    def identity(self, *, gpu_layers: int = 0) -> EngineIdentity:
        """Who this engine is; ``gpu_layers`` says which backend a model loaded with it actually runs on."""
        lc = self._llama_cpp
        ggml_base = _ggml_library(lc, "ggml-base")
        gpu_offload = bool(lc.llama_supports_gpu_offload())
        devices = _devices(lc)
        gpus = [device for device in devices if device[1] in {"gpu", "igpu"}]
        if gpu_layers != 0 and gpu_offload and gpus:
            backend = gpus[0][0]
            used = tuple(device[2] for device in gpus)
        else:
            backend = "cpu"
            used = tuple(device[2] for device in devices if device[1] == "cpu") or ("CPU",)
        return EngineIdentity(
            name=ENGINE_NAME,
            version=str(lc.__version__),
            # llama-cpp-python does not expose llama.cpp's build number, and its source distribution vendors
            # llama.cpp as a shallow submodule, so a build number compiled in would read 1. ggml_commit() is
            # the vendored llama.cpp commit (ggml is built from inside that tree): the one precise pin.
            build=_c_string(ggml_base, "ggml_commit"),
            ggml_version=_c_string(ggml_base, "ggml_version"),
            backend=backend,
            devices=used,
            gpu_offload=gpu_offload,
            system_info=lc.llama_print_system_info().decode("utf-8", "replace").strip(),
            python=f"{platform.python_implementation()} {platform.python_version()}",
            platform=platform.platform(),
            cpu=read_cpu_name(),
        )

    def load(self, model_path: Path, backend: BackendSettings) -> LlamaCppModel:
        """Load the model once; the result serves every smoke prompt and must be closed."""
        return LlamaCppModel(self, model_path, backend)


def _gpu_layers(backend: BackendSettings) -> int:
    if str(backend.kind) == "cpu":
        # A CPU stack never offloads, whatever gpu-layers says: the backend kind is the decision.
        return 0
    return -1 if backend.gpu_layers is None else backend.gpu_layers


def _flash_attention(value: bool | str | None) -> bool:
    if value is None or value in {False, "off"}:
        return False
    if value in {True, "on"}:
        return True
    raise EngineError(
        f"backend.flash-attention = {value!r} is not supported by {ENGINE_NAME}: it can only turn flash "
        "attention on or off, and 'auto' would let the machine decide",
        hint="set backend.flash-attention to 'on' or 'off' in llmstack.toml",
    )


def _cache_type(llama_cpp: Any, key: str, value: str | None) -> int | None:
    if value is None:
        return None
    ggml_type = getattr(llama_cpp, f"GGML_TYPE_{value.upper()}", None)
    if not isinstance(ggml_type, int):
        raise EngineError(
            f"backend.{key} = {value!r} is not a ggml type known to {ENGINE_NAME}",
            hint="use f16, bf16, f32, q8_0, q5_1, q5_0, q4_1, q4_0 or iq4_nl",
        )
    return ggml_type


class LlamaCppModel:
    """A GGUF model loaded in llama.cpp; serves many prompts, each from an empty KV cache."""

    def __init__(self, engine: LlamaCppEngine, model_path: Path, backend: BackendSettings) -> None:
        lc = engine._llama_cpp
        self._engine = engine
        self._lc = lc
        self._path = model_path
        if not model_path.is_file():
            raise EngineError(
                f"model file not found: {model_path}",
                hint="fetch the locked model again (stacklock lock) or fix model.source in llmstack.toml",
            )
        self._gpu_layers = _gpu_layers(backend)
        if self._gpu_layers != 0 and not lc.llama_supports_gpu_offload():
            raise EngineError(
                f"backend.kind = {backend.kind!s} needs GPU offload; this {ENGINE_NAME} build is CPU-only",
                hint="reinstall it with GPU support (CMAKE_ARGS='-DGGML_CUDA=on') or set backend.kind 'cpu'",
            )
        threads = backend.threads if isinstance(backend.threads, int) else None
        if backend.context_size is None:
            raise EngineError(
                f"backend.context-size is unknown in the lock, and {ENGINE_NAME} needs one to load the model",
                hint="set backend.context-size in llmstack.toml and re-lock",
            )
        options: dict[str, Any] = {
            "n_gpu_layers": self._gpu_layers,
            "n_ctx": backend.context_size,
            "n_threads": threads,
            "n_threads_batch": threads,
            "flash_attn": _flash_attention(backend.flash_attention),
            "type_k": _cache_type(lc, "cache-type-k", backend.cache_type_k),
            "type_v": _cache_type(lc, "cache-type-v", backend.cache_type_v),
            "verbose": False,
        }
        if backend.batch_size is not None:
            options["n_batch"] = backend.batch_size
        ENGINE_LOG.clear()
        try:
            self._llm = lc.Llama(str(model_path), **options)
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(
                f"{ENGINE_NAME} could not load {model_path}: {exc}{ENGINE_LOG.quote()}",
                hint="check that the file is the locked GGUF (stacklock verify reports its hash) and that "
                "this engine version supports its architecture",
            ) from exc
        self._ctx = self._llm.ctx
        self._vocab = lc.llama_model_get_vocab(self._llm.model)
        self._n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self._n_ctx = int(self._llm.n_ctx())
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._scratch = _float_buffer(self._n_vocab)
        self._closed = False

    # The engine's view of itself -------------------------------------------------------------------------

    def identity(self) -> EngineIdentity:
        return self._engine.identity(gpu_layers=self._gpu_layers)

    @property
    def chat_format(self) -> str | None:
        """The chat format llama-cpp-python picked on its own for this model (``llama-2`` without one)."""
        return cast("str | None", self._llm.chat_format)

    def builtin_chat_render(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str] | None:
        """Render as ``Llama.create_chat_completion`` would, with the chat format llama-cpp-python picked."""
        llm = self._llm
        if llm.chat_handler is not None or llm.chat_format is None:
            return None
        from llama_cpp import llama_chat_format  # noqa: PLC0415 - part of the optional engine.

        handler = llm._chat_handlers.get(llm.chat_format)
        if handler is None:
            handler = llama_chat_format.get_chat_completion_handler(llm.chat_format)
        # Registered chat formats are stored as completion handlers that close over the formatter; the
        # formatter alone renders without generating.
        for cell in getattr(handler, "__closure__", None) or ():
            formatter = cell.cell_contents
            if not callable(formatter) or formatter is handler:
                continue
            try:
                response = formatter(messages=[dict(message) for message in messages])
            except Exception:  # noqa: BLE001 - a formatter that cannot render has no opinion to report.
                return None
            prompt = getattr(response, "prompt", None)
            if isinstance(prompt, str):
                return str(llm.chat_format), prompt
        return None

    # Tokens -----------------------------------------------------------------------------------------------

    def bos_id(self) -> int | None:
        token = int(self._llm.token_bos())
        return None if token < 0 else token

    def eos_id(self) -> int | None:
        token = int(self._llm.token_eos())
        return None if token < 0 else token

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> tuple[int, ...]:
        self._check_open()
        try:
            tokens = self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=parse_special)
        except RuntimeError as exc:
            raise EngineError(
                f"{ENGINE_NAME} failed to tokenize the prompt: {exc}{ENGINE_LOG.quote()}"
            ) from exc
        return tuple(int(token) for token in tokens)

    def _piece_bytes(self, token: int, *, special: bool) -> bytes:
        size = self._lc.llama_token_to_piece(
            self._vocab, token, self._piece_buffer, len(self._piece_buffer), 0, special
        )
        if size < 0:
            # A negative size is the length the piece needs; pieces are short, so this is rare.
            self._piece_buffer = ctypes.create_string_buffer(-size)
            size = self._lc.llama_token_to_piece(
                self._vocab, token, self._piece_buffer, len(self._piece_buffer), 0, special
            )
        return bytes(self._piece_buffer.raw[:size])

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """The tokens' pieces joined, as the generated text is built; special tokens shown when asked."""
        self._check_open()
        return b"".join(self._piece_bytes(int(t), special=special) for t in tokens).decode("utf-8", "replace")

    # Generation -------------------------------------------------------------------------------------------

    def _sampler_chain(self, sampler: KnownSampler) -> Any:
        lc = self._lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lc.llama_sampler_chain_add
        # The same chain, in the same order, as llama-cpp-python's Llama._init_sampler builds for generate().
        add(
            chain,
            lc.llama_sampler_init_penalties(
                self._n_vocab,
                sampler.repeat_last_n,
                sampler.repeat_penalty,
                sampler.frequency_penalty,
                sampler.presence_penalty,
            ),
        )
        seed = sampler.seed
        if sampler.temperature == 0:
            add(chain, lc.llama_sampler_init_greedy())
        elif sampler.mirostat == 1:
            add(
                chain,
                lc.llama_sampler_init_mirostat(
                    self._n_vocab, seed, sampler.mirostat_tau, sampler.mirostat_eta, 100
                ),
            )
        elif sampler.mirostat == 2:
            add(chain, lc.llama_sampler_init_mirostat_v2(seed, sampler.mirostat_tau, sampler.mirostat_eta))
        else:
            add(chain, lc.llama_sampler_init_top_k(sampler.top_k))
            add(chain, lc.llama_sampler_init_typical(sampler.typical_p, 1))
            add(chain, lc.llama_sampler_init_top_p(sampler.top_p, 1))
            add(chain, lc.llama_sampler_init_min_p(sampler.min_p, 1))
            add(chain, lc.llama_sampler_init_temp(sampler.temperature))
            add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    def _reset(self) -> None:
        # Clearing the whole memory (not a prefix of it) makes each prompt independent of the previous one.
        memory = self._lc.llama_get_memory(self._ctx)
        if memory is not None:
            self._lc.llama_memory_clear(memory, True)
        self._llm.n_tokens = 0

    def _eval(self, tokens: Sequence[int], position: int) -> None:
        try:
            self._llm.eval(tokens)
        except RuntimeError as exc:
            raise EngineError(
                f"{ENGINE_NAME} crashed while evaluating tokens at position {position}: {exc}{ENGINE_LOG.quote()}",
                hint="check the backend settings (context-size, batch-size) and the engine's log",
            ) from exc

    def _logits(self) -> npt.NDArray[np.float32]:
        import numpy as np  # noqa: PLC0415 - numpy comes with the optional engine.

        pointer = self._lc.llama_get_logits_ith(self._ctx, -1)
        if not pointer:
            raise EngineError(f"{ENGINE_NAME} returned no logits for the last position")
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def generate(
        self,
        prompt_tokens: Sequence[int],
        *,
        sampler: SamplerSettings,
        max_tokens: int,
        stop: Sequence[str],
        top_k_logprobs: int = 5,
    ) -> Generation:
        """Generate from token ids, with the top-k logprobs of every step; stop strings cut the text."""
        self._check_open()
        prompt = [int(token) for token in prompt_tokens]
        if not prompt:
            raise InputError("the prompt has no tokens", hint="give the smoke prompt some text")
        known = _known_sampler(sampler)
        # The last line behind the lock's policy-context-overflow finding, which works from an upper bound.
        if len(prompt) + max_tokens > self._n_ctx:
            raise EngineError(
                f"the prompt ({len(prompt)} tokens) plus max-tokens ({max_tokens}) exceed the context "
                f"size ({self._n_ctx})",
                hint="raise backend.context-size or lower max-tokens in llmstack.toml, and re-lock",
            )
        k = max(1, min(top_k_logprobs, self._n_vocab))
        tokens: list[int] = []
        pieces: list[str] = []
        steps: list[StepLogprobs] = []
        output = bytearray()
        stop_reason: StopReason = "max-tokens"
        text: str | None = None
        self._reset()
        chain = self._sampler_chain(known)
        try:
            self._eval(prompt, 0)
            while len(tokens) < max_tokens:
                step = self._step(chain, k)
                steps.append(step)
                tokens.append(step.token)
                pieces.append(self._piece_bytes(step.token, special=True).decode("utf-8", "replace"))
                if self._lc.llama_vocab_is_eog(self._vocab, step.token):
                    stop_reason = "eos"
                    break
                output += self._piece_bytes(step.token, special=False)
                cut = first_stop(output.decode("utf-8", "replace"), stop) if stop else None
                if cut is not None:
                    text, stop_reason = cut, "stop-string"
                    break
                if len(tokens) < max_tokens:
                    self._eval([step.token], len(prompt) + len(tokens) - 1)
        finally:
            self._lc.llama_sampler_free(chain)
        return Generation(
            prompt_tokens=tuple(prompt),
            tokens=tuple(tokens),
            pieces=tuple(pieces),
            steps=tuple(steps),
            text=output.decode("utf-8", "replace") if text is None else text,
            stop_reason=stop_reason,
        )

    def _step(self, chain: Any, k: int) -> StepLogprobs:
        logits = self._logits()
        top, log_norm = top_logprobs(logits, k, self._scratch)
        # The sampler reads the same logits row; it is called after the row was read, not before.
        token = int(self._lc.llama_sampler_sample(chain, self._ctx, -1))
        if token < 0 or token >= self._n_vocab:
            raise EngineError(f"{ENGINE_NAME} sampled an invalid token id {token}")
        return StepLogprobs(token=token, logprob=float(logits[token]) - log_norm, top=top)

    # Lifetime ---------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"the {ENGINE_NAME} model {self._path} was already closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._llm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class KnownSampler:
    """Every sampler value llama.cpp's sampler chain needs, none of them unknown."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    repeat_penalty: float
    repeat_last_n: int
    frequency_penalty: float
    presence_penalty: float
    mirostat: int
    mirostat_tau: float
    mirostat_eta: float
    seed: int


def _known_sampler(sampler: SamplerSettings) -> KnownSampler:
    """The sampler values, or an :class:`EngineError` naming those the lock gives as unknown."""
    values = {name: getattr(sampler, name) for name in KnownSampler.__dataclass_fields__}
    unknown = [name.replace("_", "-") for name, value in values.items() if value is None]
    if unknown:
        raise EngineError(
            f"{ENGINE_NAME} cannot run with sampler values the lock gives as unknown: "
            + ", ".join(f"sampler.{name}" for name in unknown),
            hint="set them in llmstack.toml's [sampler] and re-lock",
        )
    return KnownSampler(**values)


# Vocabularies at least this large find their top-k through block maxima; smaller ones just partition.
_BLOCK = 256


def _float_buffer(size: int) -> npt.NDArray[np.float32]:
    import numpy as np  # noqa: PLC0415 - numpy comes with the optional engine.

    return np.empty(size, dtype=np.float32)


def top_logprobs(
    logits: npt.NDArray[np.float32], k: int, scratch: npt.NDArray[np.float32] | None = None
) -> tuple[tuple[tuple[int, float], ...], float]:
    """The k most likely (token id, logprob) pairs of one logits row, best first (ties: lower id first), and
    the row's log-normaliser, so that any token's logprob is ``logits[token] - normaliser``.

    A full sort, or even ``argpartition``, of a 262k-entry row costs milliseconds per step. The k-th largest
    of the row's block maxima is a threshold that at least k entries reach, and every true top-k entry
    reaches it, so only the few entries above it are sorted; this is exact, not an approximation.
    """
    import numpy as np  # noqa: PLC0415 - numpy comes with the optional engine.

    n = logits.shape[0]
    k = max(1, min(k, n))
    # With at least k blocks, the k-th largest block maximum is reached by k entries (one per block).
    if n >= _BLOCK * max(4, k):
        whole = n - n % _BLOCK
        maxima = logits[:whole].reshape(-1, _BLOCK).max(axis=1)
        if whole < n:
            maxima = np.append(maxima, logits[whole:].max())
        threshold = np.partition(maxima, -k)[-k]
        candidates = np.flatnonzero(logits >= threshold)
    else:
        candidates = np.arange(n)
    values = logits[candidates]
    order = np.lexsort((candidates, -values))[:k]
    peak = float(values[order[0]])
    buffer = scratch if scratch is not None and scratch.shape == logits.shape else np.empty_like(logits)
    np.subtract(logits, np.float32(peak), out=buffer)
    np.exp(buffer, out=buffer)
    log_norm = peak + float(np.log(buffer.sum(dtype=np.float64)))
    return tuple((int(candidates[i]), float(values[i]) - log_norm) for i in order), log_norm
