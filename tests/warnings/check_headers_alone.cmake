# Every header of polyattn (public and detail/) compiles on its own: for each one a translation
# unit that includes only that header is compiled (-fsyntax-only) with a user's strict warning
# flags and -Werror, polyattn as a plain -I, Eigen and xsimd as system headers. A header that
# leans on another header having been included first, or that warns, fails the test.
#
# Parsing Eigen and xsimd was two thirds of each compile (2.9 s of a header's 3 s with g++), so
# with g++ they are parsed once, into a precompiled header that is force-included (-include)
# ahead of a header whose own includes reach both <Eigen/Core> and <xsimd/xsimd.hpp> anyway
# (followed through polyattn's "..." includes). For such a header the prefix changes nothing:
# it includes its polyattn headers at its top, and those bring Eigen and xsimd before any line
# of its own; every header it includes is checked alone too. A header that reaches only one
# of them, or neither, is compiled without the prefix, so a missing include still shows.
#
#   cmake -DCXX=<compiler> -DCXX_ID=<GNU|Clang|...> -DINCLUDE_DIR=<polyattn include dir>
#         -DSYSTEM_DIRS=<dir;dir> -DOPENMP=ON|OFF -DWORK_DIR=<dir> -P check_headers_alone.cmake
cmake_minimum_required(VERSION 3.21)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

include(${CMAKE_CURRENT_LIST_DIR}/strict_flags.cmake)
set(flags ${strict_flags} -march=native)

file(GLOB_RECURSE headers RELATIVE ${INCLUDE_DIR} ${INCLUDE_DIR}/polyattn/*.hpp)
list(SORT headers)

# The third-party headers a polyattn header includes, itself or through its "..." includes,
# into `out`: "E" for <Eigen/Core>, "X" for <xsimd/xsimd.hpp>.
function(third_party_reach header out)
  set(todo ${INCLUDE_DIR}/${header})
  set(seen)
  set(reach)
  while(todo)
    list(POP_FRONT todo file)
    if(file IN_LIST seen)
      continue()
    endif()
    list(APPEND seen ${file})
    file(STRINGS ${file} lines REGEX "^[ \t]*#[ \t]*include")
    get_filename_component(dir ${file} DIRECTORY)
    foreach(line IN LISTS lines)
      if(line MATCHES "<Eigen/Core>")
        list(APPEND reach E)
      elseif(line MATCHES "<xsimd/xsimd.hpp>")
        list(APPEND reach X)
      elseif(line MATCHES "\"([^\"]+)\"")
        get_filename_component(next ${CMAKE_MATCH_1} ABSOLUTE BASE_DIR ${dir})
        list(APPEND todo ${next})
      endif()
    endforeach()
  endwhile()
  set(${out} ${reach} PARENT_SCOPE)
endfunction()

set(prefix)
if(CXX_ID STREQUAL "GNU")
  set(prefix ${WORK_DIR}/third_party.hpp)
  file(WRITE ${prefix} "#include <Eigen/Core>\n#include <xsimd/xsimd.hpp>\n")
  execute_process(COMMAND ${CXX} ${flags} -x c++-header ${prefix} -o ${prefix}.gch
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)  # then every header parses Eigen and xsimd itself
    message(STATUS "no precompiled Eigen + xsimd (${rc}): ${err}")
    set(prefix)
  endif()
endif()

set(failed)
set(prefixed 0)
foreach(header IN LISTS headers)
  string(MAKE_C_IDENTIFIER ${header} name)
  set(tu ${WORK_DIR}/${name}.cpp)
  file(WRITE ${tu} "#include <${header}>\n")
  set(header_flags)
  if(prefix)
    third_party_reach(${header} reach)
    if("E" IN_LIST reach AND "X" IN_LIST reach)
      set(header_flags -include ${prefix})
      math(EXPR prefixed "${prefixed} + 1")
    endif()
  endif()
  execute_process(COMMAND ${CXX} ${flags} -fsyntax-only ${header_flags} ${tu}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    list(APPEND failed ${header})
    message(SEND_ERROR "${header} does not compile alone:\n${out}\n${err}")
  endif()
endforeach()
list(LENGTH headers n)
if(failed)
  message(FATAL_ERROR "headers that do not compile alone: ${failed}")
endif()
message(STATUS "all ${n} headers compile alone, warning-free (${prefixed} after the precompiled Eigen + xsimd)")
