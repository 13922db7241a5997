# casyncio build. Targets: all (lib cli examples), tests, test, run, bench, install, uninstall,
# clean, check-deps.
# MODE=release|asan|tsan|debug selects flags and the build directory (build/MODE).
# CC=clang works as well as gcc; both build with -Wall -Wextra -Werror.

PREFIX ?= /usr/local
DESTDIR ?=
MODE ?= release
CC ?= cc
ifeq ($(origin CC),default)
CC := cc
endif

B := build/$(MODE)
SONAME_MAJOR := 0
VERSION := 0.1.0

WARN := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wno-unused-parameter
BASE_CFLAGS := -std=c17 -D_GNU_SOURCE -g $(WARN) -Iinclude -pthread -fvisibility=hidden
ifeq ($(MODE),release)
OPT := -O2
else ifeq ($(MODE),debug)
OPT := -O0
else ifeq ($(MODE),asan)
OPT := -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
SAN_LDFLAGS := -fsanitize=address,undefined
else ifeq ($(MODE),tsan)
OPT := -O1 -fsanitize=thread
SAN_LDFLAGS := -fsanitize=thread
else
$(error MODE must be release, debug, asan or tsan)
endif
CFLAGS_ALL := $(BASE_CFLAGS) $(OPT) $(CFLAGS)
# Each object also records the headers it included (its .d file, read at the end), so that a
# changed private header rebuilds every object that uses it, tests included.
DEPFLAGS := -MMD -MP
LIBS := -luring -pthread -lm

LIB_SRCS := $(wildcard src/*.c)
LIB_OBJS := $(patsubst src/%.c,$(B)/obj/%.o,$(LIB_SRCS))
CLI_SRCS := $(wildcard src/cli/*.c)
CLI_OBJS := $(patsubst src/cli/%.c,$(B)/obj/cli/%.o,$(CLI_SRCS))
TEST_SRCS := $(wildcard tests/test_*.c)
TEST_BINS := $(patsubst tests/%.c,$(B)/tests/%,$(TEST_SRCS))
TEST_SUPPORT := $(B)/obj/tests/harness.o $(B)/obj/tests/custom_loop.o \
		$(B)/obj/tests/contract_util.o
EXAMPLE_SRCS := $(wildcard examples/*.c)
EXAMPLE_BINS := $(patsubst examples/%.c,$(B)/examples/%,$(EXAMPLE_SRCS))

.PHONY: all lib cli examples tests test test-all run bench install uninstall clean check-deps
.SECONDARY:

all: lib cli examples

lib: $(B)/libcasyncio.a $(B)/libcasyncio.so

check-deps:
	@sh tools/deps.sh build

$(B)/obj/%.o: src/%.c include/casyncio.h $(wildcard src/*.h) | check-deps
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(DEPFLAGS) -fPIC -c $< -o $@

$(B)/obj/cli/%.o: src/cli/%.c include/casyncio.h $(wildcard src/cli/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(DEPFLAGS) -c $< -o $@

$(B)/libcasyncio.a: $(LIB_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(B)/libcasyncio.so: $(LIB_OBJS)
	$(CC) -shared -Wl,-soname,libcasyncio.so.$(SONAME_MAJOR) $(SAN_LDFLAGS) -o $@ $^ $(LIBS)

ifneq ($(CLI_SRCS),)
cli: $(B)/casyncio
$(B)/casyncio: $(CLI_OBJS) $(B)/libcasyncio.a
	$(CC) $(CFLAGS_ALL) -o $@ $(CLI_OBJS) $(B)/libcasyncio.a $(LIBS) -lm
else
cli:
endif

examples: $(EXAMPLE_BINS)
$(B)/examples/%: examples/%.c $(B)/libcasyncio.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -o $@ $< $(B)/libcasyncio.a $(LIBS) -lm

# ----- tests -------------------------------------------------------------------------
$(B)/obj/tests/%.o: tests/%.c tests/harness.h tests/contract_util.h tests/cli_run.h tests/test_list.h \
		include/casyncio.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(DEPFLAGS) -Itests -c $< -o $@

$(B)/gen/%_list.c: tests/%.c tools/gen-test-list.sh
	@mkdir -p $(dir $@)
	sh tools/gen-test-list.sh $< > $@

$(B)/obj/gen/%_list.o: $(B)/gen/%_list.c tests/test_list.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(DEPFLAGS) -Itests -c $< -o $@

$(B)/tests/%: $(B)/obj/tests/%.o $(B)/obj/gen/%_list.o $(TEST_SUPPORT) $(B)/libcasyncio.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -o $@ $^ $(LIBS) -lm

tests: $(TEST_BINS)

# `make test` builds everything (the examples too) and runs every test program; the last
# line is "MODE: N passed, N failed, N skipped" (release: ...). tools/deps.sh installs what is
# missing (valgrind and clang are CI's alone: tools/deps.sh ci).
# The Python tests (test-python, below) run first for PYTHON in the release and debug modes (a
# sanitizer build cannot be loaded into an interpreter); their failure fails `make test` after
# the C tests ran. PYTHON_TESTS=0 leaves them out (CI runs them apart, for every interpreter).
PYTHON_TESTS ?= 1
test:
	@sh tools/deps.sh test
	@$(MAKE) --no-print-directory all tests
	@py=0; if [ "$(PYTHON_TESTS)" != 0 ] && { [ "$(MODE)" = release ] || [ "$(MODE)" = debug ]; }; then \
		sh python/test.sh $(B) '$(CC)' '$(PYTHON)' || py=1; fi; \
		sh tools/run-tests.sh $(B) $(MODE) || exit 1; exit $$py

# ----- run, bench ----------------------------------------------------------------------
run: all
	@sh tools/run.sh $(B)

bench: all
	@sh bench/run.sh $(B)

# ----- python -----------------------------------------------------------------------
# `make python PYTHON=/abs/python3.X PYTHON_DEST=/abs/DIR` builds the casyncio package for that
# interpreter into DIR/casyncio (docs/python.md). `make test-python` runs the package's tests and
# CPython's own subprocess watcher tests against it for PYTHON; `make test-python-all` does so
# for every CPython 3.8+ that pyenv installed (CI). Each prints "python: N passed, N failed, N
# skipped".
PYTHON ?= python3
PYTHON_DEST ?= build/python

.PHONY: python test-python test-python-all
python: lib
	@sh python/build.sh '$(PYTHON)' '$(PYTHON_DEST)' '$(B)' '$(CC)'

test-python: lib
	@sh python/test.sh '$(B)' '$(CC)' '$(PYTHON)'

test-python-all: lib
	@sh python/test.sh '$(B)' '$(CC)' all

# ----- install -----------------------------------------------------------------------
install: all
	install -d $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/bin
	install -m 644 include/casyncio.h $(DESTDIR)$(PREFIX)/include/casyncio.h
	install -m 644 $(B)/libcasyncio.a $(DESTDIR)$(PREFIX)/lib/libcasyncio.a
	install -m 755 $(B)/libcasyncio.so $(DESTDIR)$(PREFIX)/lib/libcasyncio.so.$(VERSION)
	ln -sf libcasyncio.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/libcasyncio.so.$(SONAME_MAJOR)
	ln -sf libcasyncio.so.$(SONAME_MAJOR) $(DESTDIR)$(PREFIX)/lib/libcasyncio.so
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@VERSION@|$(VERSION)|g' casyncio.pc.in \
		> $(DESTDIR)$(PREFIX)/lib/pkgconfig/casyncio.pc
	if [ -f $(B)/casyncio ]; then install -m 755 $(B)/casyncio $(DESTDIR)$(PREFIX)/bin/casyncio; fi
	if [ -f docs/casyncio.1 ]; then install -d $(DESTDIR)$(PREFIX)/share/man/man1 && \
		install -m 644 docs/casyncio.1 $(DESTDIR)$(PREFIX)/share/man/man1/casyncio.1; fi
	@sh tools/post-install.sh "$(DESTDIR)" "$(PREFIX)"

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/include/casyncio.h $(DESTDIR)$(PREFIX)/lib/libcasyncio.* \
		$(DESTDIR)$(PREFIX)/lib/pkgconfig/casyncio.pc $(DESTDIR)$(PREFIX)/bin/casyncio \
		$(DESTDIR)$(PREFIX)/share/man/man1/casyncio.1

clean:
	rm -rf build

# ----- fault sweeps, fuzzers, soak (docs/testing.md) -------------------------------------
# `make sweep`: the allocation-failure sweep and the resource-limit checks, in MODE's build.
# `make fuzz`: libFuzzer over the public API and the CLI's parsers (clang, ASan; FUZZ_SECONDS
# each). `make soak`: threads replacing policies and watchers while others spawn (SOAK_SECONDS
# in each of SOAK_MODES' builds, default asan and tsan).
FAULT_WRAP := malloc calloc realloc aligned_alloc posix_memalign strdup strndup free pthread_create \
	ca__clone_raw
FAULT_WRAP_LDFLAGS := $(foreach f,$(FAULT_WRAP),-Wl,--wrap=$(f))
SOAK_SECONDS ?= 600
SOAK_MODES ?= asan tsan
FUZZ_SECONDS ?= 60

.PHONY: sweep fuzz soak fault-bins fuzz-bins

# The test custom loop (tests/custom_loop.c) is test support, not the library: it does not
# survive a failed allocation, so its calls go straight to the real allocator (uncounted).
$(B)/fault/custom_loop_uncounted.o: $(B)/obj/tests/custom_loop.o
	@mkdir -p $(dir $@)
	objcopy $(foreach f,malloc calloc realloc free,--redefine-sym $(f)=__real_$(f)) $< $@

# The library's objects, not the archive: a weak reference (ca_uring_child_watcher_new) does
# not pull a member out of an archive.
$(B)/fault/workload: tests/fault/workload.c tests/fault/alloc_wrap.c tests/fault/alloc_wrap.h \
		$(LIB_OBJS) $(B)/fault/custom_loop_uncounted.o
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -o $@ tests/fault/workload.c tests/fault/alloc_wrap.c $(LIB_OBJS) \
		$(B)/fault/custom_loop_uncounted.o $(FAULT_WRAP_LDFLAGS) -rdynamic $(LIBS)

$(B)/fault/limits: tests/fault/limits.c $(B)/libcasyncio.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -o $@ tests/fault/limits.c $(B)/libcasyncio.a $(LIBS)

fault-bins: $(B)/fault/workload $(B)/fault/soak $(B)/fault/limits

# Two closing lines: "sweep: ..." (one per N) and "limits: ..." (one per case).
sweep: fault-bins
	@sh tools/sweep.sh $(B) $(MODE); a=$$?; $(B)/fault/limits; b=$$?; [ $$a -eq 0 ] && [ $$b -eq 0 ]

$(B)/fault/soak: tests/fault/soak.c $(LIB_OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -o $@ tests/fault/soak.c $(LIB_OBJS) $(LIBS)

# One run per mode in SOAK_MODES (default: ASan, then TSan), SOAK_SECONDS each.
soak:
	@for m in $(SOAK_MODES); do $(MAKE) --no-print-directory MODE=$$m build/$$m/fault/soak || exit 1; done
	@r=0; for m in $(SOAK_MODES); do SOAK_SECONDS=$(SOAK_SECONDS) sh tools/soak.sh build/$$m $$m || r=1; done; exit $$r

# The fuzzers: always clang with libFuzzer, ASan and UBSan, in their own build directory; the
# library (and the CLI without main.c) compiled in, instrumented for coverage.
FUZZ_B := build/fuzz
FUZZ_CC ?= clang
FUZZ_CFLAGS := $(BASE_CFLAGS) -O1 -fno-omit-frame-pointer \
	-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
FUZZ_CLI_SRCS := $(filter-out src/cli/main.c,$(CLI_SRCS))

$(FUZZ_B)/fuzz_api: tests/fuzz/fuzz_api.c $(LIB_SRCS) include/casyncio.h $(wildcard src/*.h)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ tests/fuzz/fuzz_api.c $(LIB_SRCS) $(LIBS)

$(FUZZ_B)/fuzz_cli: tests/fuzz/fuzz_cli.c $(LIB_SRCS) $(FUZZ_CLI_SRCS) include/casyncio.h \
		$(wildcard src/*.h src/cli/*.h)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -Isrc/cli -o $@ tests/fuzz/fuzz_cli.c $(FUZZ_CLI_SRCS) $(LIB_SRCS) $(LIBS)

fuzz-bins: $(FUZZ_B)/fuzz_api $(FUZZ_B)/fuzz_cli

# FUZZ_SECONDS per target (CI: 60); the corpus grows in build/fuzz/corpus_* from the seeds.
fuzz: fuzz-bins
	@FUZZ_SECONDS=$(FUZZ_SECONDS) sh tools/fuzz.sh $(FUZZ_B)

-include $(shell find $(B)/obj -name '*.d' 2>/dev/null)
