"""The probe's own reading of the ``admin`` table agrees with tomllib, or declines (issue 19).

``admin_table`` may answer None (the probe then parses the file with tomllib) for any document; when it answers,
its answer must be tomllib's. The forms below are every way TOML 1.0 lets a document give ``admin.listen`` (and
its siblings) a value, plus the traps a line-based reader could fall into.
"""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbitproxy.admin.tomlscan import admin_table

SERVICES = (
    '[[services]]\nname = "amqp"\nlisten = "0.0.0.0:5672"\n'
    '[[services.backends]]\nname = "r1"\naddress = "127.0.0.1"\nport = 5672\n'
)


def expected(text: str) -> dict[str, object]:
    admin = tomllib.loads(text).get("admin", {})
    assert isinstance(admin, dict)
    return admin


# Documents the scanner answers: each is read exactly as tomllib reads it.
DECIDED = [
    "",
    SERVICES,
    '[admin]\nlisten = "0.0.0.0:9080"\n',
    "[admin]\nlisten = '0.0.0.0:9080'\n",
    '[admin]\nlisten="0.0.0.0:9080"\ntoken="s"\nenabled=false\n',
    '\t[ admin ]  # the admin API\n\tlisten\t=\t"[::]:9080"   # all addresses\n  enabled = true\n',
    '["admin"]\n"listen" = "127.0.0.1:9080"\n',
    "['admin']\n'listen' = '127.0.0.1:9080'\n'token' = 'x\"y'\n",
    'admin.listen = "127.0.0.1:9080"\nadmin.token = "t"\n',
    'admin . listen = "127.0.0.1:9080"\n"admin".\'enabled\' = false\n',
    '# [admin]\n# listen = "nope"\n[admin]\nlisten = "127.0.0.1:1" # listen = "no"\n',
    '[admin]\n\n# blank lines and comments\n\nlisten = "127.0.0.1:1"\n' + SERVICES,
    SERVICES + '[admin]\nlisten = "127.0.0.1:2"\n',
    '[admin]\nlisten = "a#b:1"\ntoken = "[admin]"\n',
    # An admin table elsewhere in the tree is not the root one.
    '[services]\nadmin.listen = "no:1"\n[x.admin]\nlisten = "no:2"\n',
    '[services.admin]\nlisten = "no:1"\n[admin]\nlisten = "yes:0"\n',
    'x = { admin = { listen = "no:1" } }\n[admin]\nlisten = "yes:1"\n',
    # Multi-line arrays whose lines look like headers or admin keys.
    'a = [\n  ["admin"],\n  "[admin]",\n]\nb = [\n[\n"listen = 1"\n]\n]\n[admin]\nlisten = "yes:2"\n',
    'a = [ # comment with ]\n  1, # ]]\n]\n[admin]\nlisten = "yes:3"\n',
    'a = "quote \\" and [admin]"\nb = \'[admin] \\\'\n[admin]\nlisten = "yes:4"\n',
    'a = { b = "}", c = [1, 2] }\n[admin]\nlisten = "yes:5"\n',
    '[admin]\nlisten = "127.0.0.1:9080"\n[admin2]\nlisten = "no:1"\n',
    '[admin]\nlisten = "\u00e9:1"\n',
    '[admin]\nlisten = "tab\there:1"\n',
    "[admin]\nenabled = true\n",
    "[admin]\n",
    '[admin]\nlisten = ""\n',
]


@pytest.mark.parametrize("text", DECIDED)
def test_decided_forms_read_as_tomllib_reads_them(text: str) -> None:
    assert admin_table(text) == expected(text)


# Valid documents the scanner leaves to tomllib, because reading them needs more than it knows.
DECLINED = [
    '[admin]\nlisten = """127.0.0.1:9080"""\n',
    "[admin]\nlisten = '''127.0.0.1:9080'''\n",
    '[admin]\nlisten = "127.0.0.1:\\u0039080"\n',
    '["\\u0061dmin"]\nlisten = "127.0.0.1:9080"\n',
    '[admin]\n"lis\\u0074en" = "127.0.0.1:9080"\n',
    'admin = { listen = "127.0.0.1:9080" }\n',
    "admin = {}\n",
    "[[admin]]\nlisten = 'x:1'\n",
    '[admin]\nlisten = "x:1"\n[admin.tls]\ncert = "c"\n',
    "[admin]\nlisten = 9080\n",
    "[admin]\nenabled = 1\n",
    '[admin]\nlisten = ["x:1"]\n',
    "[admin]\nlisten.host = 'x'\n",
    # A multi-line string anywhere may hide a "[admin]" line from a line reader.
    'doc = """\n[admin]\nlisten = "evil:1"\n"""\n[admin]\nlisten = "x:1"\n',
    "doc = '''\nadmin.listen = 'evil:1'\n'''\n",
    # ... even where every line on its own balances its quotes.
    'doc = """abc"\n[admin]\nlisten = "evil:1"\nk = "v"""\n',
    "doc = '''abc'\nadmin.listen = 'evil:1'\nk = 'v'''\n",
]


@pytest.mark.parametrize("text", DECLINED)
def test_forms_it_does_not_read_go_to_tomllib(text: str) -> None:
    tomllib.loads(text)  # valid TOML: tomllib decides these
    assert admin_table(text) is None


# Documents tomllib refuses in or around the admin table: the scanner must not answer for them either, so the
# probe reports the error ``serve`` would report.
INVALID = [
    "[admin\n",
    '[admin]\nlisten = "x:1\n',
    "[admin]\nlisten = 'x:1\n",
    '[admin]\nlisten = "x:1" junk\n',
    '[admin] junk\nlisten = "x:1"\n',
    '[admin]\nlisten = "x:1"\nlisten = "y:1"\n',
    '[admin]\nlisten = "x:1"\n[admin]\ntoken = "t"\n',
    'admin.listen = "x:1"\n[admin]\ntoken = "t"\n',
    '[admin]\nlisten = "x\x01:1"\n',
    "[admin]\nenabled = truex\n",
    "[admin]\nlisten\n",
    "[ad min]\n",
    "[admin]\nlisten = \n",
    "a = [1,\n[admin]\nlisten = 'x:1'\n",
    "a = ]\n",
    "\u00e9 = 1\n",
    '[admin]\r\nlisten = "x:1"\r\n',  # not universal newlines: a bare CR is refused, not guessed at
]


@pytest.mark.parametrize("text", INVALID)
def test_documents_tomllib_refuses_are_not_answered(text: str) -> None:
    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(text.replace("\r\n", "\r"))
    assert admin_table(text) is None


# Pieces of TOML documents, put together at random below: statements at the root, table headers, and the traps
# above. Many combinations are invalid TOML (a key twice, a table twice); only the valid ones are compared.
PIECES = [
    "[admin]",
    "[ 'admin' ]",
    '["admin"]',
    "[[admin]]",
    "[admin.sub]",
    "[services]",
    "[[services]]",
    "[services.admin]",
    'listen = "127.0.0.1:1"',
    "listen = '[::]:2'",
    'listen = "\\u0031:3"',
    'token = "t"',
    "enabled = false",
    "enabled = true",
    'admin.listen = "h:4"',
    "admin.enabled = false",
    'admin = { listen = "h:5" }',
    'name = "[admin]"',
    "x = [\n  [1],\n  ['admin'],\n]",
    'x = """\n[admin]\n"""',
    "x = 1 # [admin]",
    "# [admin]",
    "",
]


@given(st.lists(st.sampled_from(PIECES), max_size=8))
def test_answers_agree_with_tomllib(pieces: list[str]) -> None:
    text = "\n".join(pieces) + "\n"
    answer = admin_table(text)
    try:
        want = tomllib.loads(text).get("admin", {})
    except tomllib.TOMLDecodeError:
        # Invalid TOML: whatever the scanner says, the probe's fallback (load_admin) or serve reports the error.
        return
    assert answer is None or answer == want
