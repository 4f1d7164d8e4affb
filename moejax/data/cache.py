"""Integrity of the datasets moejax builds (synthetic_mixture, local_text,
python_stdlib).

Where they live: TFDS's layout under the data dir (``data.data_dir``, default
``~/tensorflow_datasets``),

    <data_dir>/<name>/<config name>/<version>/
        dataset_info.json, features.json     (TFDS metadata)
        <name>-<split>.array_record-<i>-of-<n>   (one file per split shard)
        moejax_checksums.json                (size and sha256 of each shard)
        metadata.json                        (python_stdlib: its provenance)

All are generated locally (from a seed, the user's text files, or the
Python standard library), so a damaged copy can always be rebuilt. After a build
``write_checksums`` records every shard's size and sha256; ``find_problem``
checks a directory before it is used: dataset_info.json parses, every shard it
lists exists, opens as an ArrayRecord file, holds the record count it lists,
and has the recorded checksum; a builder's further JSON files (its
``CHECKED_FILES``) parse. A directory built before checksums existed is
read through once instead (ArrayRecord verifies each chunk's hash) and then
gets its checksum file. A truncated, zeroed, half-deleted or bit-flipped
cache is therefore found when it is opened, not mid-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Optional, Sequence

from array_record.python.array_record_module import ArrayRecordReader

CHECKSUM_FILE = 'moejax_checksums.json'
INFO_FILE = 'dataset_info.json'
# TFDS's default shard naming (dataset_info.json's filepathTemplate).
_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'


class DataCacheError(ValueError):
  """A corrupt dataset directory that could not be rebuilt; the message
  names the corrupt file and the directory to delete."""


def dataset_dir(data_dir: str, name: str, config_name: str,
                version: str) -> str:
  """``<data_dir>/<name>/<config name>/<version>`` (TFDS's layout)."""
  return os.path.join(os.path.expanduser(data_dir), name, config_name,
                      version)


def _short(error: BaseException, limit: int = 160) -> str:
  """The first line of an error, at most `limit` characters."""
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return text if len(text) <= limit else text[:limit - 3] + '...'


def shard_files(directory: str) -> list[tuple[str, int]]:
  """(path, record count) of every shard dataset_info.json lists.

  Raises:
    OSError / ValueError / KeyError / TypeError: dataset_info.json is
    missing, not JSON, or lacks the split list.
  """
  with open(os.path.join(directory, INFO_FILE), encoding='utf-8') as f:
    info = json.load(f)
  shards = []
  for split in info['splits']:
    lengths = [int(n) for n in split.get('shardLengths', [])]
    for i, count in enumerate(lengths):
      name = split.get('filepathTemplate', _TEMPLATE).format(
          DATASET=info['name'], SPLIT=split['name'],
          FILEFORMAT=info.get('fileFormat', 'array_record'),
          SHARD_X_OF_Y=f'{i:05d}-of-{len(lengths):05d}')
      shards.append((os.path.join(directory, name), count))
  return shards


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _read_checksums(directory: str) -> Optional[dict]:
  """The checksum file's {shard file name: {'bytes', 'sha256'}}, or None
  if there is none (or it is unreadable: the shards are then read through)."""
  try:
    with open(os.path.join(directory, CHECKSUM_FILE), encoding='utf-8') as f:
      sums = json.load(f)
  except (OSError, ValueError):
    return None
  return sums if isinstance(sums, dict) else None


def write_checksums(directory: str) -> bool:
  """Records size and sha256 of every shard in ``moejax_checksums.json``.

  Best effort: a read-only data dir keeps working without it (every load
  then reads the shards through). Returns whether the file was written.
  """
  try:
    sums = {os.path.basename(path): {'bytes': os.path.getsize(path),
                                     'sha256': _sha256(path)}
            for path, _ in shard_files(directory)}
    target = os.path.join(directory, CHECKSUM_FILE)
    tmp = f'{target}.tmp-{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(sums, f, indent=1, sort_keys=True)
    os.replace(tmp, target)
    return True
  except (OSError, ValueError, KeyError, TypeError):
    return False


def _shard_problem(path: str, count: int, sums: Optional[dict]) -> str:
  """'' if the shard is intact, else what is wrong with it."""
  if not os.path.isfile(path):
    return 'missing'
  try:
    reader = ArrayRecordReader(path)
  except Exception as e:  # pylint: disable=broad-except
    return f'unreadable ({_short(e)})'
  try:
    if not reader.ok():
      return (f'unreadable (truncated or overwritten: {os.path.getsize(path)}'
              ' bytes with no valid ArrayRecord footer)')
    if reader.num_records() != count:
      return (f'holds {reader.num_records()} records, {INFO_FILE} lists '
              f'{count}')
    entry = (sums or {}).get(os.path.basename(path))
    if entry is None:  # no checksum yet: read every record (hash-checked)
      reader.read_all()
    elif (os.path.getsize(path) != entry.get('bytes') or
          _sha256(path) != entry.get('sha256')):
      return (f'differs from the file that was built (size or sha256 not '
              f'those in {CHECKSUM_FILE})')
  except Exception as e:  # pylint: disable=broad-except
    return f'unreadable ({_short(e)})'
  finally:
    try:
      reader.close()
    except Exception:  # pylint: disable=broad-except
      pass  # closing a reader of a corrupt file raises its error again
  return ''


def _json_problem(path: str) -> str:
  """'' if `path` holds a JSON object, else what is wrong with it."""
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except FileNotFoundError:
    return 'missing'
  except (OSError, ValueError) as e:
    return f'unreadable ({type(e).__name__}: {_short(e)})'
  return '' if isinstance(value, dict) else 'not a JSON object'


def find_problem(directory: str,
                 json_files: Sequence[str] = ()) -> Optional[str]:
  """Checks a prepared dataset directory.

  Args:
    directory: ``<data_dir>/<name>/<config>/<version>``.
    json_files: further files of the directory that must hold a JSON
      object (e.g. ``metadata.json`` of ``python_stdlib``).

  Returns:
    None if it does not exist (not built yet) or is intact, else
    ``'<corrupt file>: <what is wrong>'``. An intact directory without a
    checksum file gets one.
  """
  if not os.path.isdir(directory):
    return None
  info = os.path.join(directory, INFO_FILE)
  try:
    shards = shard_files(directory)
  except FileNotFoundError:
    return f'{info}: missing'
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'{info}: unreadable ({type(e).__name__}: {_short(e)})'
  for name in json_files:
    problem = _json_problem(os.path.join(directory, name))
    if problem:
      return f'{os.path.join(directory, name)}: {problem}'
  sums = _read_checksums(directory)
  for path, count in shards:
    problem = _shard_problem(path, count, sums)
    if problem:
      return f'{path}: {problem}'
  if sums is None or set(sums) != {os.path.basename(p) for p, _ in shards}:
    write_checksums(directory)
  return None


def remove(directory: str, problem: str) -> None:
  """Deletes a corrupt dataset directory (to be rebuilt).

  Raises:
    DataCacheError naming the corrupt file and the directory to delete,
    when it cannot be deleted (e.g. a read-only data dir).
  """
  try:
    shutil.rmtree(directory)
  except OSError as e:
    raise DataCacheError(
        f'the data cache is corrupt ({problem}) and could not be deleted for'
        f' a rebuild ({_short(e)}); delete the directory {directory} and '
        're-run: it is rebuilt from data.* (nothing else is lost).') from e
