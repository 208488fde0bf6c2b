from django import template

from studio.formatting import format_duration, format_fields, format_value, split_fields

register = template.Library()


@register.filter
def duration(seconds):
    """{{ run.duration|duration }} -> "4 m 05 s"."""
    return format_duration(seconds)


@register.filter
def compact(value):
    """{{ value|compact }}: 4 significant digits for floats, JSON for lists and dicts."""
    return format_value(value, width=80)


@register.inclusion_tag("studio/_event_values.html")
def event_values(event):
    """An event's values: scalars on one line, lists of records as small tables, lists as lines."""
    scalars, tables, lists = split_fields(event.fields)
    shown_tables = []
    for key, rows in tables.items():
        columns = list(dict.fromkeys(k for row in rows for k in row))
        shown_tables.append((key, columns, [[format_value(row.get(c, ""), 40) for c in columns] for row in rows]))
    return {"scalars": format_fields(scalars, 60), "tables": shown_tables, "lists": list(lists.items())}


@register.filter
def metric(run, name):
    """{{ run|metric:"loss" }} -> {"last", "min", "max", ...} from the run's summary, or {}."""
    return run.metric_summary(name)
