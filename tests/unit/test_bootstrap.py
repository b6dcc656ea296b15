"""cocon.images.bootstrap without debootstrap: the host's apt sources (one-line and deb822), the
mirror chosen from them, debootstrap's output as progress, the rootfs clean-up, argument checks."""

from __future__ import annotations

import os
import stat

import pytest

from cocon.images.bootstrap import (
    STAGES,
    AptSource,
    DebootstrapProgress,
    bootstrap,
    bootstrap_debian,
    choose_mirror,
    clean_debian_rootfs,
    find_apt_mirror,
    parse_deb822_sources,
    parse_one_line_sources,
    read_apt_sources,
    remove_work_dir,
)
from cocon.images.errors import ImageError
from cocon.images.store import ImageStore

# Example hosts only (RFC 2606 names and RFC 5737 addresses): nothing here names a real mirror.
ONE_LINE = """\
# the main archive
deb http://mirror.example.org/debian bookworm main contrib   # trailing comment
deb-src http://mirror.example.org/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://192.0.2.7/debian/ bookworm-updates main
deb [ arch=amd64,arm64 trusted=yes ] https://security.example.org/debian-security bookworm-security main
deb [enabled=no] http://disabled.example.org/debian trixie main
  deb   http://spaces.example.org/debian   sid   main
deb http://broken.example.org/debian
deb [arch=amd64 http://unclosed.example.org/debian bookworm main
#deb http://commented.example.org/debian bookworm main
"""

DEB822 = """\
# Comments before the first paragraph
Types: deb deb-src
URIs: http://mirror.example.org/debian http://second.example.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# a comment inside a paragraph
URIs: http://security.example.org/debian-security
Suites: bookworm-security
Components: main

types: deb-src
uris: http://src-only.example.org/debian
suites: bookworm

Types: deb
URIs: http://off.example.org/debian
Suites: trixie
Components: main
Enabled: no

Types: deb
URIs:
 http://folded.example.org/debian
Suites: trixie
 forky
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBFyUmOUBEAC
 -----END PGP PUBLIC KEY BLOCK-----
"""


def uris(sources: list[AptSource]) -> list[str]:
    return [s.uri for s in sources]


# --- apt sources -----------------------------------------------------------------------------------------


def test_one_line_format() -> None:
    found = parse_one_line_sources(ONE_LINE, "sources.list")
    assert uris(found) == [
        "http://mirror.example.org/debian",
        "http://192.0.2.7/debian/",
        "https://security.example.org/debian-security",
        "http://spaces.example.org/debian",
    ]
    assert found[0] == AptSource(
        "http://mirror.example.org/debian", ("bookworm",), ("main", "contrib"), "sources.list:2"
    )
    assert found[1].suites == ("bookworm-updates",) and found[1].origin == "sources.list:4"
    assert found[2].suites == ("bookworm-security",)
    assert found[3].suites == ("sid",)


def test_deb822_format() -> None:
    found = parse_deb822_sources(DEB822, "debian.sources")
    assert uris(found) == [
        "http://mirror.example.org/debian",
        "http://second.example.org/debian",
        "http://security.example.org/debian-security",
        "http://folded.example.org/debian",
    ]
    assert found[0].suites == ("bookworm", "bookworm-updates")
    assert found[0].components == ("main",)
    assert found[0].origin == "debian.sources:2"
    assert found[3].suites == ("trixie", "forky")


def test_deb822_without_trailing_blank_line_and_crlf() -> None:
    text = "Types: deb\r\nURIs: http://mirror.example.org/debian\r\nSuites: bookworm\r\nComponents: main"
    assert uris(parse_deb822_sources(text)) == ["http://mirror.example.org/debian"]


def test_read_apt_sources_in_apts_order(tmp_path: os.PathLike[str]) -> None:
    etc = str(tmp_path)
    os.makedirs(os.path.join(etc, "sources.list.d"))

    def write(name: str, text: str) -> None:
        with open(os.path.join(etc, name), "w") as f:
            f.write(text)

    write("sources.list", "deb http://first.example.org/debian bookworm main\n")
    write("sources.list.d/b.sources", "Types: deb\nURIs: http://third.example.org/debian\nSuites: sid\n")
    write("sources.list.d/a.list", "deb http://second.example.org/debian trixie main\n")
    write("sources.list.d/c.list.disabled", "deb http://ignored.example.org/debian bookworm main\n")
    write("sources.list.d/d.list.save", "deb http://ignored.example.org/debian bookworm main\n")
    write("sources.list.d/bad name.list", "deb http://ignored.example.org/debian bookworm main\n")
    assert uris(read_apt_sources(etc)) == [
        "http://first.example.org/debian",
        "http://second.example.org/debian",
        "http://third.example.org/debian",
    ]


def test_no_apt_configuration_at_all(tmp_path: os.PathLike[str]) -> None:
    assert read_apt_sources(str(tmp_path)) == []


def src(uri: str, *suites: str) -> AptSource:
    return AptSource(uri, suites, ("main",), "test")


def test_the_wanted_suite_wins_over_earlier_sources() -> None:
    sources = [
        src("http://other.example.org/apt", "cloud-sdk-bookworm"),
        src("http://security.example.org/debian-security", "bookworm-security"),
        src("http://one.example.org/debian", "trixie"),
        src("http://two.example.org/debian", "bookworm", "bookworm-updates"),
    ]
    assert choose_mirror(sources, "bookworm") == sources[3]
    assert choose_mirror(sources, "trixie") == sources[2]


def test_else_the_main_debian_archive() -> None:
    sources = [
        src("http://security.example.org/debian-security", "bookworm-security"),
        src("http://updates.example.org/debian", "bookworm-updates", "bookworm-backports"),
        src("https://vendor.example.org/node", "nodistro"),
        src("http://main.example.org/debian", "bookworm"),
        src("http://later.example.org/debian", "stable"),
    ]
    chosen = choose_mirror(sources, "trixie")
    assert chosen is not None and chosen.uri == "http://main.example.org/debian"


def test_unusable_uri_schemes_are_skipped() -> None:
    sources = [
        src("cdrom:[Debian GNU/Linux 12]/", "bookworm"),
        src("mirror+file:/etc/apt/mirrors.txt", "bookworm"),
        src("file:/srv/debian", "bookworm"),
    ]
    chosen = choose_mirror(sources, "bookworm")
    assert chosen is not None and chosen.uri == "file:/srv/debian"


def test_no_debian_source_is_a_clear_error(tmp_path: os.PathLike[str]) -> None:
    etc = str(tmp_path)
    with open(os.path.join(etc, "sources.list"), "w") as f:
        f.write(
            "deb http://archive.example.org/ubuntu jammy main\n# deb http://x.example.org/debian bookworm main\n"
        )
    assert choose_mirror(read_apt_sources(etc), "bookworm") is None
    with pytest.raises(ImageError, match=r"no Debian mirror for suite 'bookworm'.*--mirror"):
        find_apt_mirror("bookworm", etc)


def test_find_apt_mirror_strips_the_trailing_slash(tmp_path: os.PathLike[str]) -> None:
    etc = str(tmp_path)
    with open(os.path.join(etc, "sources.list"), "w") as f:
        f.write("deb [arch=amd64] http://192.0.2.7/debian/ bookworm main\n")
    assert find_apt_mirror("bookworm", etc) == "http://192.0.2.7/debian"


# --- progress --------------------------------------------------------------------------------------------

COLD = """\
I: Target architecture can be executed
I: Retrieving InRelease<SP>
I: Checking Release signature
I: Valid Release signature (key id 4D64FEC119C2029067D6E791F8D2585B8783D481)
I: Retrieving Packages<SP>
I: Validating Packages<SP>
I: Resolving dependencies of required packages...
I: Resolving dependencies of base packages...
I: Checking component main on http://mirror.example.org/debian...
I: Retrieving adduser 3.134
I: Validating adduser 3.134
I: Retrieving apt 2.6.1
I: Validating apt 2.6.1
I: Retrieving bsdutils 1:2.38.1-5+deb12u3
I: Validating bsdutils 1:2.38.1-5+deb12u3
I: Chosen extractor for .deb packages: dpkg-deb
I: Extracting adduser...
I: Extracting apt...
I: Extracting bsdutils...
I: Installing core packages...
I: Unpacking required packages...
I: Unpacking adduser...
I: Unpacking apt...
I: Unpacking bsdutils...
I: Configuring required packages...
I: Configuring adduser...
I: Configuring apt...
W: some warning
I: Configuring bsdutils...
I: Configuring apt...
I: Unpacking the base system...
I: Base system installed successfully.
""".replace("<SP>", " ")  # debootstrap prints a space after an index file's name


def feed_all(parser: DebootstrapProgress, text: str) -> list[tuple[str, int, int]]:
    events = []
    for line in text.splitlines(keepends=True):
        event = parser.feed(line)
        if event is not None:
            events.append(event)
    return events


def test_progress_of_a_first_run() -> None:
    parser = DebootstrapProgress()
    events = feed_all(parser, COLD)
    assert events[:8] == [("index", n, 0) for n in range(1, 9)]
    assert events[8:14] == [
        ("download", 0, 0), ("download", 1, 0), ("download", 1, 0),
        ("download", 2, 0), ("download", 2, 0), ("download", 3, 0),
    ]  # fmt: skip
    assert events[14:17] == [("extract", 1, 3), ("extract", 2, 3), ("extract", 3, 3)]
    assert events[17:21] == [("install", 0, 3), ("install", 1, 3), ("install", 2, 3), ("install", 3, 3)]
    assert events[21:] == [
        ("configure", 1, 3), ("configure", 2, 3), ("configure", 3, 3), ("configure", 3, 3),
        ("configure", 3, 3),
    ]  # fmt: skip
    assert parser.packages == ["adduser", "apt", "bsdutils"]
    assert {e[0] for e in events} <= set(STAGES)


def test_progress_with_a_warm_cache_and_a_hint() -> None:
    # with the .debs cached, debootstrap only validates them; the last run's count is the total
    warm = "I: Validating adduser 3.134\nI: Validating apt 2.6.1\n"
    parser = DebootstrapProgress(expected=2)
    assert feed_all(parser, warm) == [("download", 1, 2), ("download", 2, 2)]
    # a hint that was too small grows with what is seen
    parser = DebootstrapProgress(expected=1)
    assert feed_all(parser, warm) == [("download", 1, 1), ("download", 2, 2)]


def test_progress_ignores_other_lines() -> None:
    parser = DebootstrapProgress()
    for line in ("W: Retrying failed download of x", "E: Couldn't find these debs: foo", "", "garbage",
                 "I: Unpacking required packages...", "I: Configuring required packages...",
                 "I: Chosen extractor for .deb packages: dpkg-deb"):  # fmt: skip
        assert parser.feed(line) is None, line
    assert parser.stage is None


def test_a_retried_download_counts_once() -> None:
    parser = DebootstrapProgress()
    events = feed_all(parser, "I: Retrieving apt 2.6.1\nI: Validating apt 2.6.1\nI: Retrieving apt 2.6.1\n"
                              "I: Validating apt 2.6.1\n")  # fmt: skip
    assert events[-1] == ("download", 1, 0) and parser.packages == ["apt"]


# --- cleaning a debootstrapped tree ----------------------------------------------------------------------


def write(path: str, data: str = "x", mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data)
    os.chmod(path, mode)


def test_clean_debian_rootfs(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "rootfs")
    outside = os.path.join(str(tmp_path), "outside")
    write(os.path.join(outside, "history.log"), "keep me")
    epoch = 20000 * 86400 + 5000

    def r(rel: str) -> str:
        return os.path.join(root, rel)

    write(r("var/cache/apt/archives/apt_2.6.1_amd64.deb"))
    write(r("var/cache/apt/archives/lock"))
    os.makedirs(r("var/cache/apt/archives/partial"))
    write(r("var/cache/apt/pkgcache.bin"))
    write(r("var/lib/apt/lists/mirror_dists_bookworm_InRelease"))
    write(r("var/lib/apt/lists/mirror_dists_bookworm_main_binary-amd64_Packages"))
    os.makedirs(r("var/lib/apt/lists/partial"))
    write(r("var/log/dpkg.log"))
    write(r("var/log/bootstrap.log"))
    write(r("var/log/alternatives.log"))
    write(r("var/log/lastlog"), "binary stuff", 0o664)
    write(r("var/log/btmp"), "", 0o660)
    os.symlink(outside, r("var/log/apt"))  # a symlink out: never followed
    write(r("var/cache/ldconfig/aux-cache"))
    write(r("run/mount/utab"))
    write(r("etc/resolv.conf"), "nameserver 192.0.2.53\n")
    write(r("etc/hostname"), "buildhost\n")
    write(r("etc/machine-id"), "0123456789abcdef0123456789abcdef\n", 0o444)
    write(r("etc/shadow"), "root:*:20782:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nnobody:*:::::::\n", 0o640)
    write(r("etc/shadow-"), "root:*:20782:0:99999:7:::\n", 0o600)
    write(r("etc/keep.conf"), "kept")
    os.makedirs(r("dev/pts"))
    write(r("dev/null-ish"))
    os.symlink("/proc/self/fd", r("dev/fd"))

    changed = clean_debian_rootfs(root, epoch)

    assert sorted(os.listdir(r("var/cache/apt/archives"))) == ["partial"]
    assert os.listdir(r("var/cache/apt")) == ["archives"]
    assert os.listdir(r("var/lib/apt/lists")) == ["partial"]
    assert sorted(os.listdir(r("var/log"))) == ["apt", "btmp", "lastlog"]
    assert os.path.getsize(r("var/log/lastlog")) == 0
    assert stat.S_IMODE(os.stat(r("var/log/lastlog")).st_mode) == 0o664
    with open(os.path.join(outside, "history.log")) as f:
        assert f.read() == "keep me"
    assert not os.path.exists(r("var/cache/ldconfig/aux-cache"))
    assert os.listdir(r("run")) == []  # run/mount went with utab
    assert not os.path.lexists(r("etc/resolv.conf")) and not os.path.lexists(r("etc/hostname"))
    assert os.path.getsize(r("etc/machine-id")) == 0
    with open(r("etc/shadow")) as f:
        assert f.read() == "root:*:20000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nnobody:*:::::::\n"
    assert stat.S_IMODE(os.stat(r("etc/shadow")).st_mode) == 0o640
    with open(r("etc/shadow-")) as f:
        assert f.read() == "root:*:20000:0:99999:7:::\n"
    assert os.listdir(r("dev")) == []
    assert os.path.exists(r("etc/keep.conf"))
    assert "var/lib/apt/lists/mirror_dists_bookworm_InRelease" in changed
    assert "etc/machine-id (emptied)" in changed


def test_remove_work_dir_does_not_follow_symlinks(tmp_path: os.PathLike[str]) -> None:
    outside = os.path.join(str(tmp_path), "outside")
    write(os.path.join(outside, "keep"))
    work = os.path.join(str(tmp_path), "work")
    os.makedirs(os.path.join(work, "rootfs/etc"))
    os.symlink(outside, os.path.join(work, "rootfs/etc/link"))
    os.symlink(os.path.join(outside, "keep"), os.path.join(work, "rootfs/keep"))
    remove_work_dir(work)
    assert not os.path.lexists(work)
    assert os.listdir(outside) == ["keep"]
    remove_work_dir(work)  # idempotent


# --- arguments -------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: os.PathLike[str]) -> ImageStore:
    return ImageStore(os.path.join(str(tmp_path), "images"))


@pytest.mark.parametrize("what", ["alpine", "ubuntu:jammy", "busybox:1.36", "debian-slim", ""])
def test_bootstrap_names_what_it_supports(store: ImageStore, what: str) -> None:
    with pytest.raises(ImageError, match=r"busybox, debian\[:SUITE\]"):
        bootstrap(store, what)


def test_bootstrap_debian_argument_errors(store: ImageStore) -> None:
    mirror = "http://192.0.2.7/debian"
    with pytest.raises(ImageError, match="name the suite"):
        bootstrap(store, "debian:")
    with pytest.raises(ImageError, match="disagree"):
        bootstrap(store, "debian:trixie", suite="bookworm")
    with pytest.raises(ImageError, match="not a suite name"):
        bootstrap_debian(store, "debian:x", suite="Book Worm", mirror=mirror)
    with pytest.raises(ImageError, match=r"does not know the suite 'nosuchsuite'.*bookworm"):
        bootstrap_debian(store, suite="nosuchsuite", mirror=mirror)
    with pytest.raises(ImageError, match="variant 'tiny' is not supported: use one of minbase, buildd"):
        bootstrap_debian(store, variant="tiny", mirror=mirror)
    with pytest.raises(ImageError, match="'Curl;rm' is not a Debian package name"):
        bootstrap_debian(store, include=["Curl;rm"], mirror=mirror)
    with pytest.raises(ImageError, match="a list of package names"):
        bootstrap_debian(store, include="curl", mirror=mirror)
    with pytest.raises(ImageError, match="not a mirror URL"):
        bootstrap_debian(store, mirror="mirror.example.org/debian")
    with pytest.raises(ImageError, match="not a mirror URL"):
        bootstrap_debian(store, mirror="http://x.example.org/debian bookworm main")
    with pytest.raises(ImageError):
        bootstrap_debian(store, name="Not A Name!", mirror=mirror)
    assert not os.path.exists(os.path.join(store.root, "tmp")), "argument errors must come before any work"
