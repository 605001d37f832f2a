"""bench/collect.py: README's headlines and BENCHMARKS.md are what the committed results give now, and the table
parser fails loudly, naming the file and the column, when a table changes shape."""
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'bench'))
import collect  # noqa: E402 (bench/ is not a package)

TINY = """# A tiny result

| model | variant | acc. | pruned - sparse | batch 1 ratio (fit) |
|---|---|---|---|---|
| a | dense | 90.10 | +0.00 | 1.000 |
| b | 50% | 80.00 | -2.50 | 0.600 (1.20) |

Second table:

| run | share |
|---|---|
| x | 1.33% |
"""


def tiny(tmp_path, text=TINY):
    path = tmp_path / 'tiny.md'
    path.write_text(text)
    return path


def test_readme_headlines_are_current():
    "A results file changed without rerunning bench/collect.py fails here."
    readme = (ROOT / 'README.md').read_text()
    assert collect.readme_block(readme) == collect.headlines(), 'run .venv/bin/python bench/collect.py'


def test_benchmarks_md_is_current():
    assert (ROOT / 'BENCHMARKS.md').read_text() == collect.benchmarks(), 'run .venv/bin/python bench/collect.py'


def test_headlines_quote_the_worst_cells():
    "The oracle: the extremes computed by hand from the committed tables appear in the bullets."
    lines = collect.headlines().replace('\n  ', ' ').splitlines()
    assert len(lines) == len(collect.HEADLINES) and all(l.startswith('- ') for l in lines)
    memory = collect.read_table(collect.RESULTS / 'memory.md', 1, ['model', 'growth / weights'])
    worst = max(memory.rows, key=lambda r: float(r['growth / weights']))
    assert f"{worst['growth / weights']}x ({worst['model']}," in lines[collect.HEADLINES.index(collect.memory)]
    budget = collect.read_table(collect.RESULTS / 'budget.md', 1, ['model', 'budget', 'reached (asked)'])
    late = max((r for r in budget.rows if r['budget'].startswith('Latency')),
               key=lambda r: float(r['reached (asked)'].split()[0]))
    ratio = float(late['reached (asked)'].split()[0]) / float(late['reached (asked)'].split('(')[1].rstrip(')'))
    assert f"to {ratio:.2f} ({late['model']} Latency(0.5)" in lines[collect.HEADLINES.index(collect.budget)]
    noise = collect.read_table(collect.RESULTS / 'timing_noise.md', 1, ['model', 'process', 'largest'])
    widest = max((r for r in noise.rows if r['process'] == 'all'), key=lambda r: float(r['largest']))
    assert f"to {widest['largest']} (median" in lines[collect.HEADLINES.index(collect.timing_noise)]
    tp = collect.read_table(collect.RESULTS / 'prune_time.md', 1, ['model', 'fasterai / TP'])
    slowest = max(tp.rows, key=lambda r: float(r['fasterai / TP']))
    assert f"{slowest['fasterai / TP']}x ({slowest['model']})" in lines[2]


def test_parser_reads_tables(tmp_path):
    first, second = collect.parse_tables(tiny(tmp_path))
    assert first.header == ['model', 'variant', 'acc.', 'pruned - sparse', 'batch 1 ratio (fit)']
    assert [r['model'] for r in first.rows] == ['a', 'b'] and first.rows[0]['pruned - sparse'] == '+0.00'
    assert first.number_in(first.rows[1], 'pruned - sparse') == -2.5
    assert second.number == 2 and second.number_in(second.rows[0], 'share') == 1.33
    assert collect.fit_cells(first) == [('b', '50%', 'batch 1', 1.2)]


def test_parser_fails_on_a_missing_column(tmp_path):
    path = tiny(tmp_path)
    assert collect.read_table(path, 1, ['model', 'acc.']).rows[1]['acc.'] == '80.00'
    with pytest.raises(collect.TableError, match=r"tiny\.md, table 1, column 'accuracy': no such column"):
        collect.read_table(path, 1, ['model', 'accuracy'])
    with pytest.raises(collect.TableError, match=r'tiny\.md: no table 3'):
        collect.read_table(path, 3, [])


def test_parser_fails_on_a_bad_cell(tmp_path):
    table = collect.read_table(tiny(tmp_path, TINY.replace('| 80.00 |', '| n/a |')), 1, ['acc.'])
    with pytest.raises(collect.TableError, match=r"tiny\.md, table 1, column 'acc\.': 'n/a' is not a number"):
        table.number_in(table.rows[1], 'acc.')
    table = collect.read_table(tiny(tmp_path, TINY.replace('0.600 (1.20)', '0.600')), 1, ['variant'])
    with pytest.raises(collect.TableError, match=r"column 'batch 1 ratio \(fit\)': '0.600' is not"):
        collect.fit_cells(table)
    with pytest.raises(collect.TableError, match=r"column '\* ratio \(fit\)': no such column"):
        collect.fit_cells(collect.read_table(tiny(tmp_path), 2, []))


def test_parser_fails_on_a_misshapen_table(tmp_path):
    with pytest.raises(collect.TableError, match='tiny\\.md, table 2: a row has 1 cells for 2 columns'):
        collect.parse_tables(tiny(tmp_path, TINY.replace('| x | 1.33% |', '| x |')))
    with pytest.raises(collect.TableError, match='tiny\\.md, table 2: no \\|---\\| line'):
        collect.parse_tables(tiny(tmp_path, TINY.replace('\n|---|---|\n', '\n')))


def test_a_renamed_column_stops_the_headlines(tmp_path):
    "A results file whose columns changed raises, naming file and column, instead of quoting the wrong cells."
    shutil.copytree(collect.RESULTS, tmp_path, dirs_exist_ok=True)
    memory = tmp_path / 'memory.md'
    memory.write_text(memory.read_text().replace('| growth / weights |', '| growth / weights (x) |'))
    with pytest.raises(collect.TableError, match=r"memory\.md, table 1, column 'growth / weights'"):
        collect.headlines(tmp_path)


def test_only_the_block_between_the_markers_changes():
    readme = f'# Title\n\nbefore\n{collect.BEGIN}\n- old\n{collect.END}\n\nafter\n'
    expected = f'# Title\n\nbefore\n{collect.BEGIN}\n- a\n- b\n{collect.END}\n\nafter\n'
    assert collect.with_headlines(readme, '- a\n- b') == expected
    assert collect.readme_block(collect.with_headlines(readme, '- a')) == '- a'
    with pytest.raises(ValueError, match='needs one'):
        collect.with_headlines('# no markers\n', '- a')


def test_every_mutation_of_the_safety_net_still_finds_its_line():
    """scripts/mutation_check.py breaks one line per mutation; a line the code no longer holds (renamed, refactored)
    would stop the script at that mutation, so each must be found exactly once in its file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('mutation_check', ROOT / 'scripts' / 'mutation_check.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    missing = [n for n, (f, line, _) in mod.MUTATIONS.items() if (ROOT / f).read_text().count(line) != 1]
    assert not missing, missing
