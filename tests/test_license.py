"""The licence: Apache-2.0 in LICENSE (the standard text, verbatim, after
the copyright line), in the package metadata and in CITATION.cff."""

import hashlib
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt (202 lines).
APACHE_2_0_SHA256 = ('cfc7749b96f63bd31c3c42b5c471bf75'
                     '6814053e847c10f3eb003417bc523d30')


def _read(name: str) -> str:
  with open(os.path.join(REPO, name), encoding='utf-8') as f:
    return f.read()


def test_license_file_is_apache_2_0_verbatim():
  first, body = _read('LICENSE').split('\n', 1)
  assert first == 'Copyright 2026 The moejax Authors'
  assert hashlib.sha256(body.encode()).hexdigest() == APACHE_2_0_SHA256


def test_metadata_names_the_license():
  assert re.search(r"^\s*license='Apache-2\.0',$", _read('setup.py'), re.M)
  assert re.search(r'^license: "?Apache-2\.0"?$', _read('CITATION.cff'),
                   re.M)
