# tests/fuzz/fuzz.mk — builds the fuzz targets; tests/run_fuzz.sh runs it as
#   make -f tests/fuzz/fuzz.mk SRC=<source dir> OUT=<dir> ENGINE=libfuzzer|standalone [TARGETS="wire ..."]
# libfuzzer: clang, the library sources with -fsanitize=fuzzer-no-link (coverage) plus ASan+UBSan,
# each target linked with -fsanitize=fuzzer. standalone: $(CC) (gcc) with ASan+UBSan, each target
# linked with fuzz_main.c, the no-clang driver. UBSan does not recover: any report is a crash.
# The library is only the sources the targets reach (an archive, so each target pulls its own
# closure): building all of millcore under ASan would double the CI time for nothing.
SRC ?= .
OUT ?= build-fuzz
# absolute, so the dependency files name the same paths however make was called
override SRC := $(abspath $(SRC))
override OUT := $(abspath $(OUT))
ENGINE ?= libfuzzer
TARGETS ?= wire safetensors config recipe dataset chat tokenizer tokenize hub reward

OBJ := $(OUT)/obj-$(ENGINE)
SAN := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
ifeq ($(ENGINE),libfuzzer)
FCC := clang
COV := -fsanitize=fuzzer-no-link
LINK_MAIN := -fsanitize=fuzzer
DRIVER :=
else
FCC := $(CC)
COV :=
LINK_MAIN :=
DRIVER := $(OBJ)/fuzz_main.o
endif

PKGS := jansson yaml-0.1 libzmq libcurl libpcre2-8 openblas sqlite3 mpfr gmp
MSGPACK := $(shell pkg-config --exists msgpack-c && echo msgpack-c || echo msgpack)
MPI_SHOW := $(shell mpicc -show 2>/dev/null)
CFLAGS := -std=c11 -D_GNU_SOURCE -O1 -g -fopenmp $(SAN) $(COV) -I$(SRC) -I$(SRC)/tests/fuzz \
          -DMILL_SOURCE_DIR='"$(SRC)"' $(shell pkg-config --cflags $(PKGS) $(MSGPACK)) \
          $(filter -I%,$(MPI_SHOW))
LIBS := $(shell pkg-config --libs $(PKGS) $(MSGPACK)) $(filter -L% -l%,$(MPI_SHOW)) -lm -lpthread

# What the targets reach (grpo_recipe.c's optimizer defaults pull in the model's files).
LIB_SRC := common/err.c common/tensor.c common/wire.c common/config.c common/safetensors.c common/rng.c \
           common/yamlcfg.c common/ledger.c common/tokenizer.c common/bpe.c common/sha256.c \
           algos/chat.c algos/grpo.c algos/dataset.c algos/arith.c algos/verify.c algos/verify_cmp.c algos/mathexpr.c \
           algos/reward_remote.c \
           kernels/backend.c kernels/dense.c kernels/optim.c kernels/quant.c kernels/rope.c \
           trainer/model.c trainer/optimizer.c trainer/parallel.c trainer/comm.c trainer/comm_mpi.c \
           launch/grpo_recipe.c launch/recipe.c
LIB_OBJ := $(patsubst %.c,$(OBJ)/lib/%.o,$(LIB_SRC))
LIB := $(OBJ)/libfuzzcore.a

BINS := $(foreach t,$(TARGETS),$(OUT)/$(ENGINE)/fuzz_$(t))

all: $(BINS)

$(OBJ)/lib/%.o: $(SRC)/%.c
	@mkdir -p $(dir $@)
	$(FCC) $(CFLAGS) -MMD -MP -c $< -o $@

# the reader's mmap becomes a heap copy of the file (fuzz_safetensors.c says why)
$(OBJ)/safetensors_heap.o: $(SRC)/common/safetensors.c
	@mkdir -p $(dir $@)
	$(FCC) $(CFLAGS) -Dmmap=fuzz_mmap -Dmunmap=fuzz_munmap -MMD -MP -c $< -o $@

$(OBJ)/fuzz_main.o: $(SRC)/tests/fuzz/fuzz_main.c
	@mkdir -p $(dir $@)
	$(FCC) -std=c11 -D_GNU_SOURCE -O1 -g $(SAN) -MMD -MP -c $< -o $@

$(OBJ)/t/fuzz_%.o: $(SRC)/tests/fuzz/fuzz_%.c
	@mkdir -p $(dir $@)
	$(FCC) $(CFLAGS) -Wall -Wextra -MMD -MP -c $< -o $@

$(LIB): $(LIB_OBJ)
	rm -f $@
	ar rcs $@ $^

$(OUT)/$(ENGINE)/fuzz_safetensors: $(OBJ)/t/fuzz_safetensors.o $(OBJ)/safetensors_heap.o $(DRIVER) $(LIB)
	@mkdir -p $(dir $@)
	$(FCC) $(SAN) $(LINK_MAIN) -fopenmp $(filter %.o,$^) $(LIB) $(LIBS) -o $@

$(OUT)/$(ENGINE)/fuzz_%: $(OBJ)/t/fuzz_%.o $(DRIVER) $(LIB)
	@mkdir -p $(dir $@)
	$(FCC) $(SAN) $(LINK_MAIN) -fopenmp $(filter %.o,$^) $(LIB) $(LIBS) -o $@

.PHONY: all
# the targets' objects are intermediate; keep them (not .SECONDARY, which would skip a new library object)
.PRECIOUS: $(OBJ)/t/fuzz_%.o
-include $(shell find $(OBJ) -name '*.d' 2>/dev/null)
