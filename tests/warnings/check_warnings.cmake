# Compiles tests/warnings/all_entry_points.cpp as a user's strict build would and runs it: the
# flags below plus -Werror, polyattn's include directory as a plain -I (what add_subdirectory and
# find_package users get), Eigen and xsimd as system headers. Twice: -march=native (AVX-512 where
# the machine has it) and without any -m flag (baseline x86-64, SSE2). Fails on any warning in
# the polyattn headers, or if the program (a smoke test of every entry point) does not return 0.
# SYNTAX_ONLY=ON (clang) checks with -fsyntax-only and runs nothing: clang emits these warnings
# from its front end, template instantiations included, so code generation (three quarters of
# the CI's strict-compile time) adds no diagnostic; the g++ compiles, whose flow-based warnings
# need the optimiser, build and run the program.
#
#   cmake -DCXX=<compiler> -DSOURCE=<cpp> -DINCLUDE_DIR=<polyattn include dir>
#         -DSYSTEM_DIRS=<dir;dir> -DOPENMP=ON|OFF -DWORK_DIR=<dir> [-DISAS=native|plain]
#         [-DSYNTAX_ONLY=ON] -P check_warnings.cmake
cmake_minimum_required(VERSION 3.21)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

include(${CMAKE_CURRENT_LIST_DIR}/strict_flags.cmake)
set(flags ${strict_flags} -O2)

if(NOT DEFINED ISAS)
  set(ISAS native plain)
endif()
foreach(isa IN LISTS ISAS)
  set(isa_flags)
  if(isa STREQUAL "native")
    set(isa_flags -march=native)
  endif()
  set(exe ${WORK_DIR}/all_entry_points_${isa})
  if(SYNTAX_ONLY)
    set(output -fsyntax-only)
  else()
    set(output -o ${exe})
  endif()
  string(TIMESTAMP t0 "%s")
  execute_process(COMMAND ${CXX} ${flags} ${isa_flags} ${SOURCE} ${output}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  string(TIMESTAMP t1 "%s")
  math(EXPR seconds "${t1} - ${t0}")
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " shown "${CXX} ${flags} ${isa_flags} ${SOURCE}")
    message(FATAL_ERROR "strict compile (${isa}) failed:\n${shown}\n${out}\n${err}")
  endif()
  message(STATUS "${isa}: compiled warning-free in ${seconds} s")
  if(SYNTAX_ONLY)
    continue()
  endif()
  execute_process(COMMAND ${exe} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "all_entry_points (${isa}) returned ${rc}:\n${out}\n${err}")
  endif()
  message(STATUS "${isa}: ${out}")
endforeach()
