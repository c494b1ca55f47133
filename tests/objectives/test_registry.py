"""The registry: lookup by name, clear errors, and the `python -m rmjax.objectives` listing."""
import re
import subprocess
import sys

import pytest

import rmjax.objectives as obj
from rmjax.objectives.__main__ import listing
from tests.objectives.cases import own_entries


def test_unknown_name_lists_known_ones():
  with pytest.raises(ValueError, match=r"unknown objective piece 'bradley_terri'.*bradley_terry.*wco"):
    obj.get('bradley_terri')


def test_unknown_option_lists_valid_ones():
  with pytest.raises(ValueError, match=r"'bradley_terry': unknown option\(s\) margn; valid options: margin, label_smoothing"):
    obj.get('bradley_terry', margn=1.0)


def test_missing_option_is_named():
  with pytest.raises(ValueError, match=r"'uwo': missing required option\(s\) lam"):
    obj.get('uwo')


def test_alias_builds_the_same_piece():
  assert obj.entry('wco').alias_of == 'min'
  assert obj.entry('wco').factory is obj.entry('min').factory


def test_register_rejects_taken_names_and_missing_docstrings():
  def documented():
    """A docstring."""

  with pytest.raises(ValueError, match='already registered'):
    obj.register('mean', kind='aggregation')(documented)
  with pytest.raises(ValueError, match='docstring'):
    obj.register('no_doc_piece', kind='rm_loss')(lambda: None)
  with pytest.raises(ValueError, match='unknown kind'):
    obj.register('x_piece', kind='optimizer')


def test_listing_has_every_name_with_its_summary():
  text = listing()
  for e in obj.entries():
    assert f'  {e.name} ' in text
    assert e.summary in text


def test_module_main_prints_the_listing():
  out = subprocess.run([sys.executable, '-m', 'rmjax.objectives'], check=True, capture_output=True,
                       text=True, timeout=120).stdout
  for e in own_entries():
    assert re.search(rf'^  {e.name} +{re.escape(e.summary)}$', out, re.M), e.name
  assert re.search(r'^  wco +alias of min: ', out, re.M)
