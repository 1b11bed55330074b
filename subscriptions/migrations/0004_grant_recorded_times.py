"""When the gateway applied each grant and revocation (Grant.recorded_at, Grant.revoke_recorded_at).

Rows from before this migration get the times their records carry, the best that is known of them.
"""

import django.utils.timezone
from django.db import migrations, models
from django.db.models import F


def copy_record_times(apps, schema_editor):
    Grant = apps.get_model("subscriptions", "Grant")
    Grant.objects.update(recorded_at=F("granted_at"))
    Grant.objects.filter(revoked_at__isnull=False).update(revoke_recorded_at=F("revoked_at"))


class Migration(migrations.Migration):

    dependencies = [
        ("subscriptions", "0003_verbose_names"),
    ]

    operations = [
        migrations.AddField(
            model_name="grant",
            name="recorded_at",
            field=models.DateTimeField(null=True, help_text="when the gateway applied the grant"),
        ),
        migrations.AddField(
            model_name="grant",
            name="revoke_recorded_at",
            field=models.DateTimeField(blank=True, help_text="when the gateway applied the revocation", null=True),
        ),
        migrations.RunPython(copy_record_times, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="grant",
            name="recorded_at",
            field=models.DateTimeField(
                default=django.utils.timezone.now, help_text="when the gateway applied the grant"
            ),
        ),
    ]
