"""The benchmark's own arithmetic and its user-facing runs: a figure is
the median of its rounds (never the best one) with the spread of the
rounds, and the ``deliver()`` run sends, as the README shows it, to a real
smtp-sink every message it counts."""

from smtpstate.bench import Figure, make_message, run_deliver


def test_figure_is_the_median_round_with_the_spread():
    f = Figure()
    for wall, cpu in ((2.0, 1.0), (8.0, 4.0), (4.0, 2.0), (1.0, 3.0), (5.0, 5.0)):
        f.add(1000, wall, cpu)
    assert f.rate == 1000 / 4.0                 # the median wall, not the best (1.0)
    assert f.cpu_us == 3.0 / 1000 * 1e6         # the median CPU, not the least (1.0)
    assert f.rate_spread == 1 - 1.0 / 8.0
    assert f.cpu_spread == 1 - 1.0 / 5.0


def test_figure_of_an_even_count_of_rounds_takes_the_middle_two():
    f = Figure()
    for wall in (1.0, 2.0, 3.0, 10.0):
        f.add(100, wall, wall)
    assert f.rate == 100 / 2.5


def test_run_deliver_sends_every_message_it_counts(smtp_sink_server):
    for build in (False, True):
        wall, cpu = run_deliver(smtp_sink_server.port, 30, 3, make_message(), build=build)
        assert wall > 0 and cpu > 0
    assert len(smtp_sink_server.wait_for_messages(60, timeout=60)) == 60
