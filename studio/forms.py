"""The "new run" form, built from pipeline.config.FIELDS.

Values are checked by pipeline.config.resolve, the same schema the CLI and the
stage commands use, so a message reads the same everywhere. The form only
renders the inputs (with the schema's help, min and max for the browser)
and maps the schema's errors onto the fields. A valid form's `resolved` is
the configuration the run is created with: actions.create_run stores it as
it is, without resolving it again.
"""

from __future__ import annotations

from django import forms

from pipeline import config, stages


class StageCheckboxes(forms.CheckboxSelectMultiple):
    """Stage checkboxes; stages whose module is not in this checkout are greyed out."""

    def create_option(self, name, value, label, selected, index, subindex=None, attrs=None):
        option = super().create_option(name, value, label, selected, index, subindex, attrs)
        if not stages.get(value).available:
            option["attrs"]["disabled"] = True
        return option


class StagesField(forms.MultipleChoiceField):
    widget = StageCheckboxes

    def valid_value(self, value):
        return True  # config.validate names unknown stages and lists the valid ones


def stage_choices():
    return [(s.name, s.name if s.available else f"{s.name} (coming)") for s in stages.STAGES]


def _number(value) -> str:
    # Exact for whole numbers (2^26, 10^12); "%g" would round them.
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def form_field(f: config.Field) -> forms.Field:
    attrs = {}
    if f.min is not None:
        attrs["min"] = _number(f.min)
    if f.max is not None:
        attrs["max"] = _number(f.max)
    common = dict(required=False, help_text=f.help, label=f.name)
    if f.kind is list:
        return StagesField(choices=stage_choices(), **common)
    if f.kind is int:
        return forms.CharField(widget=forms.NumberInput(attrs={**attrs, "step": "1"}), **common)
    if f.kind is float:
        return forms.CharField(widget=forms.NumberInput(attrs={**attrs, "step": "any"}), **common)
    if f.choices:
        return forms.CharField(widget=forms.Select(choices=[(c, c) for c in f.choices]), **common)
    # maxlength only for the browser: the schema checks the length and words the error.
    return forms.CharField(widget=forms.TextInput(attrs={"maxlength": str(f.max_length)}), **common)


def preset_values(preset: str) -> dict:
    """The values a preset starts from (defaults, then the preset's own)."""
    values = config.defaults()
    values.update({k: v for k, v in config.PRESETS.get(preset, {}).items() if k in config.FIELD_BY_NAME})
    return values


class NewRunForm(forms.Form):
    # The preset the shown values came from; switching presets reloads the page
    # (GET ?preset=...) so what is submitted is always what was shown.
    preset = forms.CharField(widget=forms.HiddenInput)
    name = forms.CharField(required=False, max_length=200, help_text="Optional, to tell runs apart.")

    def __init__(self, *args, preset: str = "tiny", **kwargs):
        kwargs.setdefault("initial", {"preset": preset, **preset_values(preset)})
        super().__init__(*args, **kwargs)
        for f in config.FIELDS:
            self.fields[f.name] = form_field(f)
        self.resolved: dict | None = None  # the resolved configuration, once clean() accepted it

    def config_fields(self):
        """Bound fields of the configuration knobs, in schema order (for the template)."""
        return [self[f.name] for f in config.FIELDS]

    def clean(self):
        data = super().clean()
        preset = data.get("preset", "")
        overrides = {}
        for f in config.FIELDS:
            value = data.get(f.name)
            if f.kind is list:
                overrides[f.name] = value or []
            elif value not in (None, ""):
                overrides[f.name] = value
            # A blank box keeps the preset's value.
        try:
            self.resolved = config.resolve(preset, overrides)
        except config.ConfigError as e:
            for field, message in e.errors.items():
                if field in self.fields and field != "preset":
                    self.add_error(field, message)
                else:  # the preset is a hidden input: say it above the form
                    self.add_error(None, f"{field}: {message}")
        return data
