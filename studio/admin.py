from django.contrib import admin

from studio.models import Conversation, GpuLease, Message, Run, RunEvent, StageRun


class StageRunInline(admin.TabularInline):
    model = StageRun
    extra = 0
    fields = ["order", "name", "status", "pid", "exit_code", "started_at", "finished_at"]
    readonly_fields = fields
    can_delete = False


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "preset", "status", "created_at", "started_at", "finished_at"]
    list_filter = ["status", "preset"]
    search_fields = ["id", "name"]
    readonly_fields = ["id", "created_at", "started_at", "finished_at", "supervisor_pid", "supervisor_host", "events_offset"]
    inlines = [StageRunInline]


@admin.register(StageRun)
class StageRunAdmin(admin.ModelAdmin):
    list_display = ["run", "order", "name", "status", "exit_code", "started_at", "finished_at"]
    list_filter = ["status", "name"]
    search_fields = ["run__id", "run__name"]
    list_select_related = ["run"]


@admin.register(RunEvent)
class RunEventAdmin(admin.ModelAdmin):
    list_display = ["run", "seq", "stage", "kind", "time"]
    list_filter = ["kind", "stage"]
    search_fields = ["run__id"]
    list_select_related = ["run"]


@admin.register(GpuLease)
class GpuLeaseAdmin(admin.ModelAdmin):
    list_display = ["host", "index", "run", "stage", "acquired_at"]
    list_filter = ["host"]
    list_select_related = ["run"]


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["id", "title", "owner", "mode", "run", "stage", "step", "updated_at"]
    list_filter = ["mode", "stage"]
    search_fields = ["title", "owner__username"]
    list_select_related = ["owner", "run"]
    raw_id_fields = ["leaf", "run"]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["id", "conversation", "role", "status", "finish", "created_at"]
    list_filter = ["role", "status"]
    search_fields = ["content"]
    raw_id_fields = ["conversation", "parent"]
