"""Every public name has a docstring in one style (Google), the docs site
documents every public name, and the docstrings' examples run."""

import ast
import dataclasses
import doctest
import importlib
import inspect
import os
import re
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The modules whose `__all__` is the public API (the docs' API pages).
PUBLIC_MODULES = ('tfp_ffjord', 'tfp_ffjord.ode', 'tfp_ffjord.training',
                  'tfp_ffjord.vi', 'tfp_ffjord.datasets',
                  'tfp_ffjord.dynamics', 'tfp_ffjord.multiscale',
                  'tfp_ffjord.baselines', 'tfp_ffjord.plotting',
                  'tfp_ffjord.trace', 'tfp_ffjord.sample_quality')

SECTION = re.compile(r'^(Args|Attributes|Returns|Yields|Raises|Example|'
                     r'Examples|Note|Notes|References|Warning):\s*$')
# What Google style names a section but this package never uses (a typo or
# another style's name is a malformed docstring).
OTHER_SECTIONS = re.compile(r'^(Arguments|Parameters|Params|Return|Yield|'
                            r'Raise|Exceptions|Keyword Args):\s*$')


def sections(doc):
  """`{section name: its lines}` of a cleaned docstring."""
  found, current = {}, None
  for line in inspect.cleandoc(doc).splitlines():
    if OTHER_SECTIONS.match(line):
      raise AssertionError(f'section {line.strip()!r} is not Google style')
    match = SECTION.match(line)
    if match:
      current = match.group(1)
      found[current] = []
    elif current is not None:
      if line and not line.startswith(' '):
        current = None
      else:
        found[current].append(line)
  return found


def documented_names(lines):
  """The names an Args/Attributes section documents, in order."""
  indents = [len(l) - len(l.lstrip()) for l in lines if l.strip()]
  if not indents:
    return []
  names = []
  for line in lines:
    if line.strip() and len(line) - len(line.lstrip()) == min(indents):
      match = re.match(r'^\s*\**(\w+)( \([^)]*\))?: \S', line)
      assert match, f'not a `name: description` line: {line.strip()!r}'
      names.append(match.group(1))
  return names


def parameters(fn):
  return [p.name for p in inspect.signature(fn).parameters.values()
          if p.name not in ('self', 'cls')]


def returns_value(fn):
  """Whether `fn`'s own body returns something other than None."""
  tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
  body = tree.body[0]

  def walk(node):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                            ast.Lambda, ast.ClassDef)):
        continue
      if isinstance(child, ast.Return) and child.value is not None and not (
          isinstance(child.value, ast.Constant) and child.value.value is None):
        return True
      if walk(child):
        return True
    return False
  return walk(body)


def is_generator(fn):
  tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
  return any(isinstance(n, (ast.Yield, ast.YieldFrom))
             for n in ast.walk(tree.body[0]))


def public_objects():
  """`(qualified name, object)` for each public class and function, once."""
  seen = {}
  for module_name in PUBLIC_MODULES:
    module = importlib.import_module(module_name)
    for name in module.__all__:
      obj = getattr(module, name)
      if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        continue
      if not obj.__module__.startswith('tfp_ffjord'):
        continue
      seen.setdefault(f'{obj.__module__}.{obj.__qualname__}', obj)
  return sorted(seen.items())


def public_methods(cls):
  """`(name, docstring, parameters)` of each public method and property
  `cls` defines, read from its source (Sonnet wraps a module's methods,
  dropping their docstrings at run time)."""
  try:
    source = inspect.getsource(cls)
  except OSError:   # a `collections.namedtuple`: no source, no methods
    return
  tree = ast.parse(textwrap.dedent(source))
  for node in tree.body[0].body:
    if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and not node.name.startswith('_')):
      arguments = node.args
      params = [a.arg for a in (arguments.posonlyargs + arguments.args
                                + arguments.kwonlyargs)]
      params += [a.arg for a in (arguments.vararg, arguments.kwarg) if a]
      yield (node.name, ast.get_docstring(node),
             [p for p in params if p not in ('self', 'cls')])


def check_signature_documented(params, found, where, complete=True):
  """The Args section names exactly the parameters `params`."""
  names = documented_names(found.get('Args', []))
  extra = [n for n in names if n not in params]
  assert not extra, f'{where}: Args documents {extra}, not parameters'
  missing = [p for p in params if p not in names]
  if complete or names:
    assert not missing, f'{where}: Args does not document {missing}'


def check_function(fn, where):
  doc = inspect.getdoc(fn)
  assert doc and doc.strip(), f'{where}: no docstring'
  summary = doc.strip().splitlines()[0]
  assert summary.strip(), f'{where}: the docstring starts with a blank line'
  found = sections(doc)
  check_signature_documented(parameters(fn), found, where)
  if is_generator(fn):
    assert 'Yields' in found, f'{where}: a generator without Yields:'
  elif returns_value(fn):
    assert 'Returns' in found, f'{where}: returns a value but has no Returns:'


def check_class(cls, where):
  assert cls.__doc__ and cls.__doc__.strip(), f'{where}: no docstring'
  found = sections(cls.__doc__)
  init = cls.__dict__.get('__init__')
  if init is not None and init.__doc__:
    found.update(sections(init.__doc__))
  if dataclasses.is_dataclass(cls) or hasattr(cls, '_fields'):
    fields = ([f.name for f in dataclasses.fields(cls)]
              if dataclasses.is_dataclass(cls) else list(cls._fields))
    names = documented_names(found.get('Attributes', []) + found.get('Args',
                                                                      []))
    # A field may carry its documentation as `metadata['help']` (the
    # command line's help text: `TrainConfig`).
    helped = ([f.name for f in dataclasses.fields(cls)
               if f.metadata.get('help')]
              if dataclasses.is_dataclass(cls) else [])
    missing = [f for f in fields if f not in names + helped]
    assert not missing, f'{where}: Attributes does not document {missing}'
  elif init is not None and inspect.isfunction(init):
    # Constructor arguments go under Args:, or under Attributes: when
    # they are kept as public attributes of the same names.
    params = parameters(init)
    args = documented_names(found.get('Args', []))
    extra = [n for n in args if n not in params]
    assert not extra, f'{where}: Args documents {extra}, not parameters'
    attributes = documented_names(found.get('Attributes', []))
    missing = [p for p in params if p not in args + attributes]
    assert not missing, f'{where}: Args does not document {missing}'

  for name, doc, params in public_methods(cls):
    method = f'{where}.{name}'
    assert doc and doc.strip(), f'{method}: no docstring'
    check_signature_documented(params, sections(doc), method, complete=False)


OBJECTS = public_objects()


def test_the_public_api_is_large_enough_to_mean_something():
  # A broken walk (an empty `__all__`, a renamed module) would pass below.
  assert len(OBJECTS) > 80


@pytest.mark.parametrize('name', [name for name, _ in OBJECTS])
def test_public_docstring_is_google_style(name):
  obj = dict(OBJECTS)[name]
  if inspect.isclass(obj):
    check_class(obj, name)
  else:
    check_function(obj, name)


def test_the_api_pages_document_every_public_name():
  text = ''
  api = os.path.join(ROOT, 'docs', 'api')
  for page in os.listdir(api):
    with open(os.path.join(api, page)) as f:
      text += f.read()
  documented = set(re.findall(r'^::: ([\w.]+)$', text, re.M))
  missing = [name for name, _ in OBJECTS if name not in documented]
  assert not missing, f'not on an API page: {missing}'


def test_docstring_examples_run():
  finder = doctest.DocTestFinder(exclude_empty=True)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS
                                 | doctest.NORMALIZE_WHITESPACE)
  ran = 0
  for name, obj in OBJECTS:
    module = importlib.import_module(obj.__module__)
    for test in finder.find(obj, name, module=module,
                            globs=dict(vars(module))):
      runner.run(test)
      ran += len(test.examples)
  assert ran >= 10, f'only {ran} docstring examples'
  assert runner.failures == 0, f'{runner.failures} docstring examples failed'
