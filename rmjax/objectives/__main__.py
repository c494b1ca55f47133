"""`python -m rmjax.objectives`: lists every registered piece with its kind and summary."""
import rmjax.objectives as objectives


def listing() -> str:
  """One line per registered name, grouped by kind: `name  summary` (aliases say so)."""
  lines = []
  for kind in objectives.KINDS:
    group = objectives.entries(kind)
    if not group:
      continue
    lines.append(f'{kind}:')
    width = max(len(e.name) for e in group)
    for e in group:
      summary = f'alias of {e.alias_of}: {e.summary}' if e.alias_of else e.summary
      lines.append(f'  {e.name:<{width}}  {summary}')
  return '\n'.join(lines)


if __name__ == '__main__':
  print(listing())
