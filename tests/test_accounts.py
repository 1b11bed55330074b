"""Accounts behind bearer tokens and tickets, looked up per batch of opening streams (events.delivery.auth)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission

from events.delivery import auth
from tests.harness import wait_until


@pytest.mark.django_db
def test_users_seen_for_the_first_time_are_created_together_and_known_users_keep_their_rights(
    django_assert_max_num_queries: Any,
) -> None:
    users = get_user_model().objects
    boss = users.create(username="boss")
    boss.user_permissions.add(Permission.objects.get(codename="view_all_process_instances"))
    users.create(username="ana")
    names = ["ana", "boss"] + [f"new-{i}" for i in range(50)]
    with django_assert_max_num_queries(6):  # not three per new user
        accounts = auth._load_by_usernames(names)
    assert set(accounts) == set(names)
    assert accounts["boss"].view_all
    assert not accounts["ana"].view_all
    assert not accounts["new-7"].view_all
    assert users.filter(username__startswith="new-").count() == 50
    assert accounts["new-7"].user_id == users.get(username="new-7").pk
    assert accounts["new-7"].active
    # Seen again (or created meanwhile by another process): found, never created twice.
    assert auth._load_by_usernames(["new-7", "new-8"])["new-7"].user_id == accounts["new-7"].user_id
    assert users.filter(username="new-7").count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("size", [1, 3, 8, 13])
def test_accounts_by_name_and_by_id_carry_each_users_rights_whatever_the_batch_size(
    size: int, django_assert_num_queries: Any
) -> None:
    users = get_user_model().objects
    view_all = Permission.objects.get(codename="view_all_process_instances")
    team = Group.objects.create(name="operators")
    team.permissions.add(view_all)
    made = [users.create_user(username=f"user-{i}", password=f"pw-{i}") for i in range(size)]
    made[0].user_permissions.add(view_all)  # directly
    if size > 1:
        made[1].groups.add(team)  # through a group
    if size > 2:
        made[2].is_superuser = True
        made[2].save()
    made[-1].is_active = False
    made[-1].save()
    names = [user.username for user in made]
    for _ in range(2):  # the second time from the statement compiled the first time: still one query
        with django_assert_num_queries(1):
            by_name = auth._load_by_usernames(names)
        with django_assert_num_queries(1):
            by_id = auth._load_by_ids([user.pk for user in made] + [10**9])  # one id that matches nobody
        assert set(by_name) == set(names)
        assert set(by_id) == {user.pk for user in made}
        for index, user in enumerate(made):
            user.refresh_from_db()
            expected = auth.Account(
                user_id=user.pk,
                username=user.username,
                active=user.is_active,
                view_all=user.is_active and user.has_perm(auth.VIEW_ALL),
                session_hash=user.get_session_auth_hash(),
            )
            assert by_name[user.username] == expected, index
            assert by_id[user.pk] == expected, index
    if size >= 4:  # directly, through a group, as superuser; the others (the last one inactive) not
        assert [by_name[name].view_all for name in names] == [True, True, True] + [False] * (size - 3)


class _Lookups:
    """A load_many for auth._Batches that records its batches and holds each until released."""

    def __init__(self, *, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.fail = fail

    def __call__(self, keys: list[str]) -> dict[str, auth.Account]:
        self.batches.append(list(keys))
        assert self.release.wait(30)
        if self.fail:
            raise RuntimeError("the database is gone")
        return {key: auth.Account(len(key), key, True, False, "") for key in keys if not key.startswith("nobody")}


async def test_streams_opening_together_share_a_few_lookups_and_one_leaving_does_not_stop_the_others() -> None:
    lookups = _Lookups()
    batches = auth._Batches("name", lookups)
    prefix = f"batch-{uuid.uuid4().hex[:8]}-"
    first = asyncio.create_task(batches.get(prefix + "0"))
    await wait_until(
        lambda: lookups.batches, what="the first lookup"
    )  # the first lookup is under way; the rest queue behind it
    leaving = asyncio.create_task(batches.get(prefix + "leaves"))
    names = [f"{prefix}{i % 40}" for i in range(100)] + ["nobody-" + prefix]  # 40 users, several streams each
    waiters = [asyncio.create_task(batches.get(name)) for name in names]
    await asyncio.sleep(0.05)
    leaving.cancel()  # a client that disconnects while its account is looked up
    lookups.release.set()
    accounts = await asyncio.gather(first, *waiters)
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert [a.username if a else None for a in accounts] == [prefix + "0", *names[:-1], None]
    assert lookups.batches[0] == [prefix + "0"]
    assert sorted(lookups.batches[1]) == sorted({*names, prefix + "leaves"} - {prefix + "0"})
    assert len(lookups.batches) == 2
    # The account of the client that left was looked up all the same, and is kept like the others.
    assert (await batches.get(prefix + "leaves")).username == prefix + "leaves"  # type: ignore[union-attr]
    assert len(lookups.batches) == 2


async def test_a_failed_lookup_fails_its_waiters_and_the_next_one_tries_again() -> None:
    lookups = _Lookups(fail=True)
    batches = auth._Batches("name", lookups)
    name = f"fails-{uuid.uuid4().hex[:8]}"
    waiters = [asyncio.create_task(batches.get(name)) for _ in range(3)]
    await wait_until(lambda: lookups.batches, timeout=30, what="the lookup")
    lookups.release.set()
    for outcome in await asyncio.gather(*waiters, return_exceptions=True):
        assert isinstance(outcome, RuntimeError)
    lookups.fail = False
    assert (await batches.get(name)).username == name  # type: ignore[union-attr]
    assert len(lookups.batches) == 2
