from m2chat_lite.exercises import check


def test_check_reports_each_outcome(capsys):
    assert check("Exercise 1", None, lambda a: a == 3, "add") is None
    assert check("Exercise 1", 3, lambda a: a == 3, "add") is True
    assert check("Exercise 1", 4, lambda a: a == 3, "add one") is False
    assert check("Exercise 1", "x", lambda a: a + 1 == 3, "a number") is False
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("○ Exercise 1: not answered yet")
    assert out[1] == "✓ Exercise 1: correct!"
    assert out[2] == "✗ Exercise 1: not quite. Hint: add one"
    assert "raised TypeError" in out[3]
