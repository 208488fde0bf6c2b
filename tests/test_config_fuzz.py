"""Bad input gets an error, never a crash: property-based tests over the configuration schema.

For arbitrary overrides (the schema's keys plus junk; values of any JSON type,
huge numbers, NaN, infinities, long text, NUL, lone surrogates),
pipeline.config.resolve either returns a configuration that can be stored
(strict JSON, UTF-8, no NUL) or raises ConfigError; and the new-run form and
the estimate endpoint answer below 500 whatever a browser sends them.
The regressions that started this (NaN accepted and then refused by the
database, ENAMETOOLONG from stat(), a megabyte stored as rdzv_endpoint) are
checked by name below, through every caller: form, estimate endpoint, runjob.
"""

from __future__ import annotations

import json
import math
from urllib.parse import urlencode

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from studio.models import Run
from tests.test_studio_views import form_data
from pipeline import config
from pipeline.config import ConfigError

NAMES = [f.name for f in config.FIELDS] + ["preset", "description"]

# Text as it can reach the schema: from JSON or argv (lone surrogates, NUL), typed, or pasted by the megabyte.
ANY_CHAR = st.characters(exclude_categories=())  # surrogates (Cs) included
TEXT = st.one_of(
    st.text(ANY_CHAR, max_size=30),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-0", "1_000", "0x10", "2e9", "", " ",
                     "\x00", "tok_train,base_train", "10.0.0.1:29500", "[::1]:0", "/tmp", "/" + "a" * 300,
                     "9" * 5000, "1" + "0" * 400, "fineweb-edu", "climbmix", "\ud800", "/tmp/\udcff"]),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "/", "9", ":"]), st.integers(0, 70_000)),
)
NUMBERS = st.one_of(
    st.integers(),
    st.sampled_from([10**400, 2**63, -1, 0, 1 << 26, (1 << 26) + 1]),
    st.builds(lambda digits: -(10**digits), st.just(5000)),  # str() of it raises: built, so Hypothesis can print it
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=8)
KEYS = st.one_of(st.sampled_from(NAMES), st.text(ANY_CHAR, max_size=12))
OVERRIDES = st.dictionaries(KEYS, JSON_VALUES, max_size=6)
PRESETS = st.one_of(st.sampled_from(sorted(config.PRESETS)), JSON_VALUES)


def assert_storable(cfg: dict) -> None:
    """What the database, config.json and a command line need of an accepted configuration."""
    strict = json.dumps(cfg, allow_nan=False)  # raises on NaN/inf
    assert "\\u0000" not in strict
    json.dumps(cfg, ensure_ascii=False).encode("utf-8")  # raises on lone surrogates
    for f in config.FIELDS:
        value = cfg[f.name]
        if f.kind is float:
            assert math.isfinite(value)
        if f.kind is str:
            assert len(value) <= f.max_length
    config.stage_commands(cfg, "runs/x")


@settings(max_examples=400, deadline=None)
@given(preset=PRESETS, overrides=OVERRIDES)
def test_resolve_returns_a_storable_config_or_raises_config_error(preset, overrides):
    try:
        cfg = config.resolve(preset, overrides)
    except ConfigError as e:
        assert e.errors and all(isinstance(k, str) and isinstance(v, str) for k, v in e.errors.items())
        assert all(len(k) <= 100 and len(v) <= 1000 for k, v in e.errors.items()), e.errors
        return
    assert_storable(cfg)


@settings(max_examples=200, deadline=None)
@given(cfg=st.dictionaries(KEYS, JSON_VALUES, max_size=8))
def test_validate_of_any_mapping_returns_or_raises_config_error(cfg):
    try:
        clean = config.validate({**config.defaults(), **cfg})
    except ConfigError:
        return
    assert_storable(clean)


# --- the web: what a browser can send is text (or bytes that are not UTF-8) ------------------------------

def form_text(value) -> list[str] | str:
    """What a browser could send for `value`: text, or a list of texts for a repeated field."""
    if isinstance(value, list):
        return [v if isinstance(v, str) else dumps(v) for v in value]
    return value if isinstance(value, str) else dumps(value)


def dumps(value) -> str:
    try:
        return repr(value) if isinstance(value, float) else json.dumps(value)
    except ValueError:  # holds an int past str()'s 4300 digits: paste its like instead
        return "-" + "9" * 5000


def body(fields: dict) -> str:
    """An urlencoded body; lone surrogates go out as the invalid UTF-8 bytes a client could send."""
    return urlencode(fields, doseq=True, encoding="utf-8", errors="surrogatepass")


# A few changed fields on the form as shown, so that valid submissions (which create runs) come up too.
WEB_FIELDS = st.dictionaries(st.sampled_from(NAMES + ["name", "hardware"]), JSON_VALUES.map(form_text), max_size=3)


@pytest.mark.django_db
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(preset=st.sampled_from(sorted(config.PRESETS)) | TEXT, changes=WEB_FIELDS)
def test_new_run_form_and_estimate_never_answer_500(client, runs_dir, preset, changes):
    # Answer as a server would (a view's exception becomes a 500) rather than raise in the test.
    client.raise_request_exception = False
    fields = {**form_data("tiny"), "preset": preset, **changes}
    data = body(fields)
    response = client.post(reverse("studio:new_run"), data, content_type="application/x-www-form-urlencoded")
    assert response.status_code in (200, 302), response.status_code
    response = client.get(reverse("studio:estimate") + "?" + data)
    assert response.status_code == 200 and isinstance(response.json()["ok"], bool)


# --- the regressions, by name, through every caller ---------------------------------------------------------

BAD = [
    ("target_param_data_ratio", "nan", "finite"),
    ("target_param_data_ratio", "inf", "finite"),
    ("data_dir", "/tmp/" + "a" * 300, "255 bytes"),  # /tmp exists: stat() failed with ENAMETOOLONG
    ("rdzv_endpoint", "x" * (1 << 20), "at most 300 characters"),
    ("rdzv_endpoint", "10.0.0.1:70000", "HOST:PORT"),
]


@pytest.mark.django_db
@pytest.mark.parametrize("field, value, words", BAD)
def test_the_new_run_form_shows_the_error(client, runs_dir, field, value, words):
    response = client.post(reverse("studio:new_run"), form_data(**{field: value}))
    assert response.status_code == 200
    assert words in " ".join(response.context["form"].errors[field])
    assert Run.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("field, value, words", BAD)
def test_the_estimate_endpoint_names_the_field(client, field, value, words):
    response = client.get(reverse("studio:estimate"), form_data(**{field: value}))
    assert response.status_code == 200 and response.json()["ok"] is False
    assert words in response.json()["errors"][field]


@pytest.mark.django_db
@pytest.mark.parametrize("field, value, words", BAD[:3])
def test_runjob_refuses_with_the_field_and_the_fix(runs_dir, capsys, field, value, words):
    with pytest.raises(CommandError) as error:
        call_command("runjob", "tiny", "--set", f"{field}={value}")
    assert error.value.returncode == 2
    out = capsys.readouterr()
    assert field in out.out + out.err and words in out.out + out.err
    assert Run.objects.count() == 0
