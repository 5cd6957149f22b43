"""Names the package exports: no exported function hides a module of the same name, and the typed errors subclass
the builtins they replace (so ``except ValueError`` keeps catching them)."""
import importlib
import types
from pathlib import Path

import pytest

import timm_stitch
from timm_stitch import errors


@pytest.mark.parametrize('name', timm_stitch.__all__)
def test_no_export_hides_a_module(name):
    root = Path(timm_stitch.__file__).parent
    is_module = (root / f'{name}.py').is_file() or (root / name / '__init__.py').is_file()
    assert not is_module or isinstance(getattr(timm_stitch, name), types.ModuleType), (
        f'timm_stitch.{name} is exported and is also a module: `import timm_stitch.{name}` is ambiguous')


def test_profile_and_compile_modules_are_reachable():
    assert callable(timm_stitch.profile) and callable(timm_stitch.compile)
    assert importlib.import_module('timm_stitch.profiling').profile is timm_stitch.profile
    assert importlib.import_module('timm_stitch.compiling').compile is timm_stitch.compile


@pytest.mark.parametrize('error, builtin', [
    (errors.IncompatibleAnchorsError, ValueError), (errors.RouteIdError, ValueError),
    (errors.ReleaseFormatError, ValueError), (errors.StaleCardError, ValueError), (errors.CardError, ValueError),
    (errors.WeightsMismatchError, ValueError), (errors.DownloadError, OSError),
    (errors.ForeignFilesError, FileExistsError), (errors.NoImagesError, FileNotFoundError),
])
def test_typed_errors_subclass_the_builtin_they_replace(error, builtin):
    assert issubclass(error, builtin) and getattr(timm_stitch, error.__name__) is error
