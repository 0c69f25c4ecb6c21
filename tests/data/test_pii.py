"""PII redaction: each kind replaced and counted; look-alikes (versions, dates, non-Luhn numbers) kept."""

from __future__ import annotations

from llm.data.pii import luhn_ok, redact


def test_redacts_each_kind_and_counts():
    text = ("Write to jane.doe+news@mail.example.org or call +1 (415) 555-2671 or 415-555-2671. "
            "Server 10.0.0.254 charged card 4111 1111 1111 1111.")
    out, counts = redact(text)
    assert out == "Write to <EMAIL> or call <PHONE> or <PHONE>. Server <IP> charged card <CARD>."
    assert counts == {"email": 1, "card": 1, "ip": 1, "phone": 2}


def test_keeps_look_alikes():
    text = "Python 3.12.1 released 2024-01-05; id 1234 5678 9012 3456; address 999.1.1.1; ratio 1.5"
    out, counts = redact(text)
    assert out == text
    assert sum(counts.values()) == 0


def test_luhn():
    assert luhn_ok("4111111111111111")
    assert luhn_ok("5500005555555559")
    assert not luhn_ok("4111111111111112")


def test_only_selected_kinds():
    out, counts = redact("a@b.co at 8.8.8.8", kinds=["ip"])
    assert out == "a@b.co at <IP>"
    assert counts == {"ip": 1}


def test_decimal_digits_are_not_a_card() -> None:
    """0.09999999999999995 (from Python's own docs) has 17 digits that pass Luhn; it is a float, not a card."""
    text = "1.00 % 0.1 gives 0.09999999999999995 instead of 0.0; 4111111111111111.5 is a float too."
    assert redact(text, ["card"]) == (text, {"card": 0})
    assert redact("card 4111111111111111.", ["card"])[0] == "card <CARD>."
