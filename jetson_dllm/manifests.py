"""Versioned JSON manifests, sealed against tampering, checked against a schema, and the path rule for the files
they name. One place for what every manifest reader needs (bundle manifest, checkpoint config, data manifest).

A sealed manifest carries, as its last field, the sha256 of its own bytes with that field's value zeroed:
any byte changed anywhere in the file (whitespace included) breaks the seal, and the reader says which file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jetson_dllm.errors import DllmError
from jetson_dllm.files import atomic_write, check_makeable

SEAL = "sealed_sha256"
_ZERO = "0" * 64
_SEAL_AT_END = re.compile(rb'"' + SEAL.encode() + rb'": "([0-9a-f]{64})"\n}$')
HEX64 = r"^[0-9a-f]{64}$"
Hex = Annotated[str, Field(pattern=HEX64)]


def seal(data: dict) -> bytes:
    """The manifest's bytes with its seal as the last field."""
    body = {k: v for k, v in data.items() if k != SEAL}
    text = json.dumps({**body, SEAL: _ZERO}, indent=2, allow_nan=False)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return text[: -len(_ZERO) - 3].encode() + f'{digest}"\n}}'.encode()


def write_manifest(path: Path, data: dict) -> None:
    """Write a sealed manifest atomically (readers see the old one or the new one)."""
    atomic_write(path, seal(data))


def unseal(raw: bytes, path: Path, remedy: str) -> None:
    """Refuse bytes whose seal is missing or does not match them."""
    m = _SEAL_AT_END.search(raw)
    if m is None:
        raise DllmError(f"{path} is altered or has no integrity seal (written by an older jetson-dllm); {remedy}")
    zeroed = raw[: m.start(1)] + _ZERO.encode() + raw[m.end(1):]
    if hashlib.sha256(zeroed).hexdigest() != m.group(1).decode():
        raise DllmError(f"{path} is altered (its bytes do not match its seal); {remedy}")


def read_manifest(path: Path, fmt: str, version: int, what: str, remedy: str, schema: type[BaseModel] | None = None) -> dict:
    """A sealed JSON manifest of format `fmt` and exactly `version`, checked against `schema`; one line saying
    which file is wrong and what to do otherwise."""
    path = member(Path(path).parent, Path(path).name, what)  # the manifest, too, lies inside its folder
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DllmError(f"{path} is not UTF-8 text: altered or corrupt; {remedy}") from None
    except (json.JSONDecodeError, RecursionError):
        raise DllmError(f"{path} is truncated or corrupt; {remedy}") from None
    except OSError as e:
        raise DllmError(f"cannot read {path} ({e.strerror}); {remedy}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else None
        raise DllmError(f"{path.parent} is not a jetson-dllm {what} ({path} has format {str(found)[:40]!r})")
    found = data.get("version")
    if type(found) is not int:
        raise DllmError(f"{path}: version must be an integer, got {str(found)[:20]!r}; {remedy}")
    if found > version:
        raise DllmError(f"{path} was written by a newer jetson-dllm ({what} format {found}, this one reads {version}); upgrade jetson-dllm")
    if found < version:
        raise DllmError(f"{path} was written by an older jetson-dllm ({what} format {found}, before integrity seals); {remedy}")
    unseal(raw, path, remedy)
    if schema is not None:
        try:
            schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise DllmError(f"{path}: {where}: {first['msg'].lower()}; {remedy}") from None
    return data


def member(folder: Path, name: object, what: str = "manifest") -> Path:
    """The file `name` inside `folder`: a plain relative name (no absolute path, no `..`, no link leaving the
    folder), the one path a loader may open after checking it."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or os.path.isabs(name) or "\\" in name \
            or any(part in ("", ".", "..") for part in name.split("/")):
        raise DllmError(f"{folder}: the {what} names {str(name)[:80]!r}, which is not a plain file name inside the folder; refusing it")
    path = Path(folder) / name
    try:
        inside = path.resolve().is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise DllmError(f"{folder}: {name} leaves the folder (a link to somewhere else); refusing it")
    return path


def check_replaceable(folder: Path, marker: str, fmt: str, what: str) -> None:
    """A tool may only write into a folder that does not exist, is empty, or that it made itself: the same kind,
    recognised by its own manifest `marker` of format `fmt`. Anything else is refused, never deleted."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DllmError(f"{folder} is a file, not a folder; choose another output folder")
    check_makeable(folder)
    if not folder.exists() or not any(folder.iterdir()):
        return
    try:
        found = json.loads((folder / marker).read_bytes().decode("utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != fmt:
        raise DllmError(f"{folder} holds files that are not a {what} jetson-dllm made; refusing to replace them: choose another output folder")


# --- schemas: types and ranges of what each manifest holds (the model config checks itself) --------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class SpecialIdsSchema(_Strict):
    mask: int = Field(ge=0, lt=1 << 20)
    eot: int = Field(ge=0, lt=1 << 20)
    pad: int = Field(ge=0, lt=1 << 20)


class Split(_Strict):
    docs: int = Field(ge=0)
    tokens: int = Field(ge=0)


class DataManifest(_Strict):
    vocab_size: int = Field(ge=4, le=65536)
    special_ids: SpecialIdsSchema
    tokenizer_sha256: str = Field(pattern=HEX64)
    splits: dict[str, Split]
    files: dict[str, Hex]


class CheckpointConfig(_Strict):
    model: dict
    step: int = Field(ge=0)
    metrics: dict
    special_ids: SpecialIdsSchema
    files: dict[str, Hex]


class PrecisionEntry(_Strict):
    file: str


class Sampling(_Strict):
    k: int = Field(ge=1, le=3839)


class Heads(_Strict):
    sampling: Sampling


class BundleManifest(_Strict):
    model: dict
    special_ids: SpecialIdsSchema
    tokenizer_sha256: str = Field(pattern=HEX64)
    heads: Heads
    canvas_lengths: list[int] = Field(min_length=1)
    opset: int
    precisions: dict[str, PrecisionEntry] = Field(min_length=1)
    fp32_nodes: list[str] | dict[str, list[str]]  # a block-diffusion bundle: per graph (block_step, commit)
    files: dict[str, Hex] = Field(min_length=1)
