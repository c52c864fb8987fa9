"""Slot blocks (shared/governor/blocks.py): the arithmetic of booking several slots in one write
and handing them out later. Pure, fast."""

from __future__ import annotations

import random

from shared.governor.blocks import (
    BLOCK_MAX,
    BLOCK_SECONDS,
    Spare,
    block_size,
    give_back,
    spare_slot,
    take_block,
)
from shared.governor.pacing import AccountState, Grant, PacingConfig, Shape, TenantState, decide
from shared.hve.limits import PROFILES

CFG = PacingConfig(limits=PROFILES["preview-2024"], margin_seconds=2.0)
START = 1_800_000_000.0
A, B = "a@contoso.com", "b@contoso.com"


def test_a_process_deciding_now_and_then_books_one_slot_per_write_and_a_busy_one_a_few():
    assert block_size(0) == 1
    assert block_size(1) == 2
    assert block_size(100) == BLOCK_MAX


def _sequential(state, tenant, shape, now, n):
    """The slots n decisions one after the other would get on that one account."""
    out = []
    for _ in range(n):
        d = decide([state], tenant, shape, now, CFG, random.Random(0))
        assert isinstance(d, Grant)
        out.append(d.at)
        state, tenant = d.account_state, d.tenant_state or tenant
    return out, state, tenant


def test_a_block_holds_the_slots_decisions_one_after_the_other_would_have_got():
    shape = Shape(2, 0)  # internal mail: no rolling minute, counted by day and tenant allowance
    state = AccountState(A, day=CFG.day_of(START), internal_today=40, messages_today=20, allowance=3)
    tenant = TenantState(day=CFG.day_of(START), claimed=500)
    first = decide([state], tenant, shape, START, CFG, random.Random(0))
    assert isinstance(first, Grant) and first.at == START
    grant, extra = take_block(first, [state], tenant, shape, START, CFG, 4)
    assert extra == (START, START, START)
    expected, expected_state, expected_tenant = _sequential(state, tenant, shape, START, 4)
    assert [grant.at, *extra] == expected
    assert grant.account_state == expected_state and grant.tenant_state == expected_tenant


def test_mail_a_rolling_minute_counts_and_bookings_take_no_block():
    # A spare there that went unused held a place in the minute: the others' messages went a
    # window later.
    shape = Shape(0, 1)
    grant_now = decide([AccountState(A)], TenantState(), shape, START, CFG, random.Random(0))
    assert isinstance(grant_now, Grant) and grant_now.at == START
    assert take_block(grant_now, [AccountState(A)], TenantState(), shape, START, CFG, 4) == (grant_now, ())
    full = AccountState(A, external_slots=tuple(START - 10 + i for i in range(10)))
    booking = decide([full], TenantState(), Shape(1, 1), START, CFG, random.Random(0))
    assert isinstance(booking, Grant) and booking.at > START
    assert take_block(booking, [full], TenantState(), Shape(1, 1), START, CFG, 4) == (booking, ())


def test_a_block_takes_its_tenant_allowance_with_it():
    shape = Shape(3, 0)
    state = AccountState(A)
    tenant = TenantState(day=CFG.day_of(START), claimed=99_990)  # 10 recipients left for the tenant today
    first = decide([state, AccountState(B)], tenant, shape, START, CFG, random.Random(0))
    assert isinstance(first, Grant)
    grant, extra = take_block(first, [state, AccountState(B)], tenant, shape, START, CFG, 4)
    assert len(extra) == 2  # 3 x 3 recipients fit in what is left, a fourth message does not
    assert grant.tenant_state is not None and grant.tenant_state.claimed <= 100_000
    assert grant.account_state.internal_today == 9 and grant.account_state.allowance >= 0


def test_a_spare_is_good_for_a_moment_on_its_day_and_goes_now():
    internal = Spare(A, START, Shape(1, 0), taken=START)
    assert spare_slot(internal, START + 1.5, CFG) == START + 1.5
    assert spare_slot(internal, START + BLOCK_SECONDS + 0.01, CFG) is None
    assert spare_slot(internal, START - 0.5, CFG) is None
    # Good from the very moment of its write up to BLOCK_SECONDS after it, both ends included.
    assert spare_slot(internal, START, CFG) == START
    assert spare_slot(internal, START + BLOCK_SECONDS, CFG) == START + BLOCK_SECONDS
    midnight = CFG.day_end(CFG.day_of(START))
    late = Spare(A, midnight - 0.5, Shape(1, 0), taken=midnight - 0.5)
    assert spare_slot(late, midnight + 0.1, CFG) is None


def test_an_unused_spare_given_back_leaves_the_row_as_if_it_was_never_booked():
    shape = Shape(2, 0)
    first = decide([AccountState(A)], TenantState(), shape, START, CFG, random.Random(0))
    assert isinstance(first, Grant)
    grant, extra = take_block(first, [AccountState(A)], TenantState(), shape, START, CFG, 3)
    assert len(extra) == 2
    spares = [Spare(A, at, shape, START) for at in extra]
    back = give_back(grant.account_state, spares, CFG)
    assert (back.internal_today, back.messages_today) == (2, 1)
    # The recipients stay with the account as allowance, taken from the tenant once.
    assert back.allowance == first.account_state.allowance


def test_a_block_of_two_books_one_spare_and_a_block_of_one_none():
    shape = Shape(1, 0)
    state = AccountState(A)
    first = decide([state], TenantState(), shape, START, CFG, random.Random(0))
    assert isinstance(first, Grant) and first.at == START
    assert take_block(first, [state], TenantState(), shape, START, CFG, 2)[1] == (START,)
    grant, extra = take_block(first, [state], TenantState(), shape, START, CFG, 1)
    assert extra == () and grant.account_state == first.account_state
